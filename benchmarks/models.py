"""The three models every decode benchmark compares, built in one process with identical shapes
(and identical weights wherever the shapes allow):

- softmax: fairseq's `transformer_lm` (its MultiheadAttention, key/value cache while decoding);
- t2r:     `t2r_lm`, the softmax model's weights plus T2R feature maps;
- floor:   the softmax model with the attention *mixing* removed: q/k/v/output projections, FFN,
           layer norms and output layer kept, each position's output is out_proj(v). No attention
           variant can do less work per token, so T2R/floor is the price of its recurrence.
"""
import copy
from types import SimpleNamespace

import torch
from fairseq.modules import MultiheadAttention

USER_DIR = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "t2r_fairseq")


class FloorAttention(MultiheadAttention):
    """fairseq's MultiheadAttention whose mixing step is the identity on v (no state, no cache)."""

    def forward(self, query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
        # q and k are computed and dropped: their projections are a cost every variant pays.
        self.q_proj(query)
        self.k_proj(query)
        return self.out_proj(self.v_proj(query)), None


def model_args(arch, layers, dim, heads, ffn, feature_dim, max_positions, extra=()):
    """The model config exactly as fairseq-train would pass it to build_model."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = options.get_training_parser()
    argv = ["unused-data-dir", "--task", "language_modeling", "--arch", arch, "--user-dir", USER_DIR,
            "--decoder-layers", layers, "--decoder-embed-dim", dim, "--decoder-ffn-embed-dim", ffn,
            "--decoder-attention-heads", heads, "--dropout", 0, "--tokens-per-sample", max_positions, *extra]
    if arch.startswith("t2r"):
        argv += ["--t2r-feature-dim", feature_dim]
    return convert_namespace_to_omegaconf(options.parse_args_and_arch(parser, [str(a) for a in argv])).model


def build_models(layers=6, dim=512, heads=8, ffn=None, vocab=8000, feature_dim=32, max_positions=8448,
                 names=("softmax", "t2r", "floor"), seed=0):
    """{name: model} in eval mode, float32, CPU."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    import t2r_fairseq  # noqa: F401  (registers t2r_lm)
    from t2r_fairseq.convert import placeholder_dictionary, transfer_softmax_weights

    ffn = ffn or 4 * dim
    dictionary = placeholder_dictionary(vocab)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)

    def build(arch):
        args = model_args(arch, layers, dim, heads, ffn, feature_dim, max_positions)
        torch.manual_seed(seed)
        return ARCH_MODEL_REGISTRY[arch].build_model(args, task).eval()

    softmax = build("transformer_lm")
    models = {"softmax": softmax}
    if "t2r" in names:
        t2r = build("t2r_lm")
        transfer_softmax_weights(t2r, softmax.state_dict())
        models["t2r"] = t2r
    if "floor" in names:
        floor = copy.deepcopy(softmax)
        for layer in floor.decoder.layers:
            old = layer.self_attn
            layer.self_attn = FloorAttention(old.embed_dim, old.num_heads, self_attention=True)
            layer.self_attn.load_state_dict(old.state_dict())
        models["floor"] = floor.eval()
    return {name: models[name] for name in names}


def self_attention_modules(model):
    return [layer.self_attn for layer in model.decoder.layers]


def prefill(model, tokens, chunk=256):
    """Incremental state after reading `tokens` (batch, time): one parallel forward pass of the
    decoder, during which every self-attention module also feeds its own input through its own
    incremental path (fairseq's decoder reads only the last token when given an incremental state,
    so it cannot prefill a prompt in one call). Softmax modules get the key/value cache fairseq
    builds step by step (fed in chunks: only the cache is kept, the outputs are dropped); T2R
    modules get their (S, z) state from the chunked parallel form. Returns the state dict."""
    state = {}

    def fill(module, args, kwargs, _output):
        x = kwargs.get("query", args[0] if args else None)
        if isinstance(module, FloorAttention):
            return
        step = x.size(0) if not isinstance(module, MultiheadAttention) else chunk
        for start in range(0, x.size(0), step):
            part = x[start:start + step]
            # .forward, not __call__: calling the module would re-enter this hook.
            module.forward(part, part, part, incremental_state=state, need_weights=False)

    hooks = [m.register_forward_hook(fill, with_kwargs=True) for m in self_attention_modules(model)]
    try:
        with torch.no_grad():
            model.decoder(tokens)
    finally:
        for hook in hooks:
            hook.remove()
    return state


def state_bytes(state):
    """Bytes of the per-sequence tensors in a fairseq incremental state dict: the kv cache or the
    T2R state. T2R's folded projection weights, kept there once per run, are per model, not per
    sequence, and not counted."""
    return sum(t.numel() * t.element_size() for key, buf in state.items()
               if isinstance(buf, dict) and not key.endswith(".t2r_fused")
               for t in buf.values() if torch.is_tensor(t))
