"""The models compared, with identical shapes and weights: softmax (fairseq's `transformer_lm`); t2r (`t2r_lm`:
the softmax weights plus T2R feature maps); the VARIANTS (t2r plus one option, its new tensors as initialised);
floor (softmax without attention *mixing*: out_proj(v)): no attention variant does less work per token."""
import copy
import pathlib
from types import SimpleNamespace

import torch
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.modules import MultiheadAttention

from t2r_fairseq.attention import T2RSelfAttention
from t2r_fairseq.attention import prefill as t2r_prefill
from t2r_fairseq.transfer import placeholder_dictionary, transfer_softmax_weights

USER_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "t2r_fairseq")
WINDOW = 64
# Each option's initialisation draws no random numbers: every t2r model gets the same feature maps.
VARIANTS = {"t2r_fixed": ["--t2r-decay", "fixed"], "t2r_learned": ["--t2r-decay", "learned"],
            "t2r_gated": ["--t2r-decay", "gated"], "t2r_window": ["--t2r-window", WINDOW],
            "t2r_delta": ["--t2r-update", "delta"], "t2r_gated_delta": ["--t2r-update", "delta", "--t2r-decay", "gated"]}


class FloorAttention(MultiheadAttention):
    """fairseq's MultiheadAttention whose mixing step is the identity on v (no state, no cache)."""

    def forward(self, query, *args, **kwargs):
        self.q_proj(query)  # computed and dropped: a cost every variant pays
        self.k_proj(query)
        return self.out_proj(self.v_proj(query)), None


def build_models(layers=6, dim=512, heads=8, vocab=8000, feature_dim=32, max_positions=8448,
                 names=("softmax", "t2r", "floor", *VARIANTS), seed=0):
    """{name: model} in eval mode, float32, CPU, each built from the config fairseq-train would pass."""
    dictionary = placeholder_dictionary(vocab)
    task = SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary)

    def build(arch, *extra):
        argv = ["unused-data-dir", "--task", "language_modeling", "--arch", arch, "--user-dir", USER_DIR,
                "--decoder-layers", layers, "--decoder-embed-dim", dim, "--decoder-ffn-embed-dim", 4 * dim,
                "--decoder-attention-heads", heads, "--dropout", 0, "--tokens-per-sample", max_positions, *extra]
        args = options.parse_args_and_arch(options.get_training_parser(), [str(a) for a in argv])
        torch.manual_seed(seed)
        return ARCH_MODEL_REGISTRY[arch].build_model(convert_namespace_to_omegaconf(args).model, task).eval()

    models = {"softmax": build("transformer_lm")}
    for name in (n for n in names if n.startswith("t2r")):
        models[name] = build("t2r_lm", "--t2r-feature-dim", feature_dim, *VARIANTS.get(name, ()))
        transfer_softmax_weights(models[name], models["softmax"].state_dict())
    if "floor" in names:
        models["floor"] = with_self_attention(
            models["softmax"], lambda old: FloorAttention(old.embed_dim, old.num_heads, self_attention=True))
    return {name: models[name] for name in names}


def with_self_attention(model, build):
    """A copy of `model` whose self-attention modules are build(old module), with the old weights."""
    copied = copy.deepcopy(model)
    for layer in copied.decoder.layers:
        old, layer.self_attn = layer.self_attn, build(layer.self_attn)
        layer.self_attn.load_state_dict(old.state_dict())
    return copied.eval()


def t2r_twin(model, **options):
    """A copy of the T2R `model` (no decay) with other self-attention options (chunk_size, fold_feature_map)."""
    return with_self_attention(model, lambda old: T2RSelfAttention(
        old.embed_dim, old.num_heads, feature_dim=old.feature_map.feature_dim, window=old.window, **options))


def one_chunk(model, length):
    """A copy of `model` whose T2R self-attention runs the parallel form in chunks of `length` (one chunk:
    the T x T form), every other option (decay, window, update) as it is."""
    copied = copy.deepcopy(model)
    for layer in copied.decoder.layers:
        layer.self_attn.form.chunk_size = length
    return copied


def prefill(model, tokens, chunk=256):
    """The incremental state after reading `tokens` (batch, time) in one parallel pass (attention.prefill);
    fairseq's softmax modules, given an incremental state, read only the last token: each is fed its input."""
    state = {}

    def fill_cache(module, args, kwargs, _output):
        x = kwargs.get("query", args[0] if args else None)
        for start in range(0, x.size(0), chunk):
            part = x[start:start + chunk]
            module.forward(part, part, part, incremental_state=state, need_weights=False)  # not __call__: no hook

    hooks = [layer.self_attn.register_forward_hook(fill_cache, with_kwargs=True) for layer in model.decoder.layers
             if isinstance(layer.self_attn, MultiheadAttention) and not isinstance(layer.self_attn, FloorAttention)]
    try:
        with torch.no_grad():
            t2r_prefill(model.decoder, tokens, state)
    finally:
        for hook in hooks:
            hook.remove()
    return state


def state_bytes(state):
    """Bytes of the per-sequence tensors of an incremental state (not T2R's shared projection weights)."""
    return sum(t.numel() * t.element_size() for key, buf in state.items()
               if isinstance(buf, dict) and not key.endswith(".t2r_projection")
               for t in buf.values() if torch.is_tensor(t))
