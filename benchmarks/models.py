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
    from t2r_fairseq.transfer import placeholder_dictionary, transfer_softmax_weights

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
        models["floor"] = with_self_attention(
            softmax, lambda old: FloorAttention(old.embed_dim, old.num_heads, self_attention=True))
    return {name: models[name] for name in names}


def with_self_attention(model, build):
    """A copy of `model` whose self-attention modules are build(old module), with the old weights."""
    copied = copy.deepcopy(model)
    for layer in copied.decoder.layers:
        old = layer.self_attn
        layer.self_attn = build(old)
        layer.self_attn.load_state_dict(old.state_dict())
    return copied.eval()


def t2r_twin(model, **options):
    """A copy of the T2R `model` whose T2R self-attention modules are built with other constructor
    options (chunk_size, fold_feature_map), the same weights and T2R's feature map."""
    from t2r_fairseq.attention import T2RSelfAttention

    return with_self_attention(model, lambda old: T2RSelfAttention(
        old.embed_dim, old.num_heads, feature_dim=old.feature_map.feature_dim, **options))


def self_attention_modules(model):
    return [layer.self_attn for layer in model.decoder.layers]


def prefill(model, tokens, chunk=256):
    """Incremental state after reading `tokens` (batch, time), by one parallel forward pass of the
    decoder. T2R modules read the prefix through their multi-token incremental path
    (t2r_fairseq.attention.prefill), the one stream scoring uses. Softmax modules (fairseq's
    decoder reads only the last token when given an incremental state) are fed their own input
    again, in chunks, to build the key/value cache fairseq builds step by step (only the cache is
    kept). Returns the state dict."""
    from t2r_fairseq.attention import prefill as t2r_prefill

    state = {}

    def fill_cache(module, args, kwargs, _output):
        x = kwargs.get("query", args[0] if args else None)
        for start in range(0, x.size(0), chunk):
            part = x[start:start + chunk]
            # .forward, not __call__: calling the module would re-enter this hook.
            module.forward(part, part, part, incremental_state=state, need_weights=False)

    hooks = [m.register_forward_hook(fill_cache, with_kwargs=True) for m in self_attention_modules(model)
             if isinstance(m, MultiheadAttention) and not isinstance(m, FloorAttention)]
    try:
        with torch.no_grad():
            t2r_prefill(model.decoder, tokens, state)
    finally:
        for hook in hooks:
            hook.remove()
    return state


def state_bytes(state):
    """Bytes of the per-sequence tensors in a fairseq incremental state dict: the kv cache or the
    T2R state. T2R's projection weights, kept there once per run, are per model, not per
    sequence, and not counted."""
    return sum(t.numel() * t.element_size() for key, buf in state.items()
               if isinstance(buf, dict) and not key.endswith(".t2r_projection")
               for t in buf.values() if torch.is_tensor(t))
