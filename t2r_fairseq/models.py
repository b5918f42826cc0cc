"""T2R models: fairseq's transformer decoder with T2R attention, registered as `t2r_lm` and
`t2r_transformer`, with a `t2r_` twin of every `transformer_lm*` / `transformer*` architecture.

Only fairseq's build hooks are overridden (build_decoder_layer, build_self_attention,
build_encoder_attention), never a forward pass, so upstream fixes keep flowing in.
"""
from dataclasses import dataclass
from typing import Optional

import torch
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.distributed import fsdp_wrap
from fairseq.models import (ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY, MODEL_REGISTRY, register_model,
                            register_model_architecture)
from fairseq.models.transformer import TransformerDecoder, TransformerModel
from fairseq.models.transformer_lm import TransformerLanguageModel, TransformerLanguageModelConfig
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase
from fairseq.utils import safe_getattr

from .attention import T2RCrossAttention, T2RSelfAttention, prefill
from .errors import T2RUsageError
from .history import read_history
from .options import T2RConfig, T2ROptions, adopt_finetune_source_options, set_t2r_defaults, t2r_options


class T2RDecoderLayer(TransformerDecoderLayerBase):
    """fairseq's decoder layer with T2R self-attention (and cross-attention)."""

    def __init__(self, cfg, options: T2ROptions, no_encoder_attn=False, softmax_self_attention=False):
        # Read by the build hooks that the base __init__ calls.
        self.options = options
        self.softmax_self_attention = softmax_self_attention
        super().__init__(cfg, no_encoder_attn)

    def build_self_attention(self, embed_dim, cfg, add_bias_kv=False, add_zero_attn=False):
        if self.softmax_self_attention:
            return super().build_self_attention(embed_dim, cfg, add_bias_kv, add_zero_attn)
        return T2RSelfAttention(embed_dim, cfg.decoder.attention_heads, feature_map=self.options.feature_map,
                                feature_dim=self.options.feature_dim, chunk_size=self.options.chunk_size,
                                decay=self.options.decay, window=self.options.window, update=self.options.update,
                                decay_memory=self.options.decay_memory)

    def build_encoder_attention(self, embed_dim, cfg):
        if self.options.cross_attention == "softmax":
            return super().build_encoder_attention(embed_dim, cfg)
        return T2RCrossAttention(embed_dim, cfg.decoder.attention_heads, kdim=cfg.encoder.embed_dim,
                                 vdim=cfg.encoder.embed_dim, feature_map=self.options.cross_feature_map,
                                 feature_dim=self.options.cross_feature_dim)

    def make_generation_fast_(self, need_attn: bool = False, **kwargs):
        # fairseq's generate/interactive ask every layer for its attention weights here when given
        # --print-alignment; linear cross-attention has none (it never forms a target x source matrix).
        if need_attn and self.encoder_attn is not None and self.options.cross_attention != "softmax":
            raise T2RUsageError("--print-alignment needs cross-attention weights, which T2R cross-attention "
                                "does not compute; use a model trained (or converted) with "
                                "--t2r-cross-attention softmax, or drop --print-alignment")
        super().make_generation_fast_(need_attn=need_attn, **kwargs)


class T2RDecoder(TransformerDecoder):
    """fairseq's TransformerDecoder whose layers are T2RDecoderLayers."""

    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        # Checked here, once, for every way a model is built (fairseq-train, checkpoint loading,
        # t2r-convert, the Python API); the base class converts args to a TransformerConfig,
        # which drops our t2r_* options.
        self.options = t2r_options(args)
        cross_flags = [name for name in ("t2r_cross_feature_map", "t2r_cross_feature_dim")
                       if safe_getattr(args, name, None) is not None]
        if no_encoder_attn and cross_flags:
            raise T2RUsageError(f"--{cross_flags[0].replace('_', '-')} sets the features of T2R cross-attention, which "
                                f"a language model does not have: drop it (--t2r-feature-map/-dim set "
                                f"self-attention's)")
        self._layers_built = 0
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn, output_projection)

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index = self._layers_built
        self._layers_built += 1
        layer = T2RDecoderLayer(cfg, self.options, no_encoder_attn,
                                softmax_self_attention=index in self.options.softmax_layers)
        # The wrapping fairseq's own build_decoder_layer applies.
        if cfg.checkpoint_activations:
            layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
        return fsdp_wrap(layer, min_num_params=0 if cfg.checkpoint_activations else cfg.min_params_to_wrap)

    def set_num_updates(self, num_updates):
        # Kept for schedules that depend on training progress (the attention-transfer criterion).
        self.num_updates = num_updates

    def buffered_future_mask(self, tensor):
        # T2R layers are causal by construction: only softmax layers need the T x T mask.
        return super().buffered_future_mask(tensor) if self.options.softmax_layers else None


def _replace_decoder(model, args, no_encoder_attn):
    """Swap the softmax decoder fairseq built for a T2R one sharing its embeddings (and so any
    tied output projection or adaptive softmax)."""
    old = model.decoder
    model.decoder = T2RDecoder(args, old.dictionary, old.embed_tokens, no_encoder_attn=no_encoder_attn)
    return model


@dataclass
class T2RLanguageModelConfig(TransformerLanguageModelConfig, T2RConfig):
    pass


@register_model("t2r_lm", dataclass=T2RLanguageModelConfig)
class T2RLanguageModel(TransformerLanguageModel):
    """A transformer_lm whose self-attention is T2R: an RNN at generation time.

    Given the batches of the stream task (streams.py), which say which block of their streams they
    are, each forward continues from the recurrent state the previous block left, detached, as
    fairseq's transformer_xl continues from its `_mems`. Every other call (plain tasks, the hub,
    generation) is a plain forward, so no state leaks from one call into the next."""

    def __init__(self, decoder):
        super().__init__(decoder)
        self._streams = {}  # {training?: incremental state carried to the next block}

    @classmethod
    def build_model(cls, args, task):
        adopt_finetune_source_options(args)
        return _replace_decoder(super().build_model(args, task), args, no_encoder_attn=True)

    def forward(self, src_tokens, stream_block: Optional[int] = None, history_tokens: Optional[torch.Tensor] = None,
                **kwargs):
        """stream_block: this batch's index among consecutive blocks of the same streams (0: the streams
        start), or None: a plain forward. history_tokens (rows, k, block): the k blocks of text before
        each row (--history-blocks, history.py), read into the state first."""
        if history_tokens is not None:
            state = {}
            read_history(self.decoder, history_tokens, state)
            return prefill(self.decoder, src_tokens, state, **kwargs)
        if stream_block is None or kwargs.get("incremental_state") is not None:
            return super().forward(src_tokens, **kwargs)
        state = {} if stream_block == 0 else self._streams.get(self.training, {})
        if state and _rows(state) != src_tokens.size(0):
            state = {}  # another batch shape: the streams start over
        out = prefill(self.decoder, src_tokens, state, **kwargs)
        # Gradients stay inside a batch: the next one starts from the values alone. Training and
        # evaluation keep their own states, so a validation in mid-epoch leaves the training streams be.
        # (A window's position is a number, the same for every stream.)
        self._streams[self.training] = {key: {name: t.detach() if torch.is_tensor(t) else t
                                              for name, t in buffer.items()} for key, buffer in state.items()}
        return out


def _rows(state) -> int:
    return next(t.size(0) for buffer in state.values() for t in buffer.values() if torch.is_tensor(t) and t.dim() == 4)


@register_model("t2r_transformer")
class T2RTransformerModel(TransformerModel):
    """An encoder-decoder transformer whose decoder attention is T2R; the encoder keeps softmax."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, T2RConfig(), delete_default=True)

    @classmethod
    def build_model(cls, args, task):
        set_t2r_defaults(args)
        adopt_finetune_source_options(args)
        return _replace_decoder(super().build_model(args, task), args, no_encoder_attn=False)


def twin_architecture_name(arch: str) -> str:
    """transformer_lm_wiki103 -> t2r_lm_wiki103, transformer_lm -> t2r_lm,
    transformer_wmt_en_de -> t2r_transformer_wmt_en_de, transformer -> t2r_transformer."""
    if arch == "transformer_lm" or arch.startswith("transformer_lm_"):
        return "t2r_lm" + arch[len("transformer_lm"):]
    return "t2r_" + arch


def _register_twins(base_model: str, t2r_model: str):
    """Register `twin_architecture_name(X)` for every architecture X of base_model: X's defaults
    plus the T2R defaults."""
    base_cls = MODEL_REGISTRY[base_model]
    for arch, model_cls in list(ARCH_MODEL_REGISTRY.items()):
        # register_model already made `t2r_lm` (defaults from its dataclass).
        if model_cls is not base_cls or twin_architecture_name(arch) in ARCH_MODEL_REGISTRY:
            continue

        def twin_arch(args, base_arch_fn=ARCH_CONFIG_REGISTRY[arch]):
            set_t2r_defaults(args)
            base_arch_fn(args)

        register_model_architecture(t2r_model, twin_architecture_name(arch))(twin_arch)


_register_twins("transformer_lm", "t2r_lm")
_register_twins("transformer", "t2r_transformer")
