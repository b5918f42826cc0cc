"""The attention modules: each computes the textbook form, keeps one packed state [S | z] in
incremental_state (batch-first, reordered like beam search does), and the folded projection
(T2R's feature map inside q/k_proj) equals the plain one built with the same weights: values,
gradients, decode steps, and after weight changes between decoding runs."""
import copy

import pytest
import torch

from helpers import TINY_LM, build_model
from t2r_fairseq import linear_attention as la
from t2r_fairseq.attention import T2RCrossAttention, T2RSelfAttention


def _randomize(module, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # non-zero biases, so the folded bias is exercised too
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


def _pair(seed=0, dtype=torch.float64):
    """(folded, plain): the two projection forms, built as such, with the same weights."""
    folded = _randomize(T2RSelfAttention(16, 2, feature_dim=4).to(dtype), seed)
    plain = T2RSelfAttention(16, 2, feature_dim=4, fold_feature_map=False).to(dtype)
    plain.load_state_dict(folded.state_dict())
    assert folded.folded and not plain.folded
    return folded, plain


def _x(time=70, batch=3, dim=16, seed=1, dtype=torch.float64):
    return torch.randn(time, batch, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _decode(module, x, prefix, state=None):
    """Prefix in one call, then one call per position, as generation with a prompt does."""
    state = {} if state is None else state
    steps = [module(x[:prefix], x[:prefix], x[:prefix], incremental_state=state)[0]] if prefix else []
    steps += [module(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0] for t in range(prefix, len(x))]
    return torch.cat(steps)


def decode_reordered(module, x, order, split):
    """Decode x[:split] step by step, reorder the state by `order` as beam search does, and decode the
    rest of the permuted batch; returns (those outputs, the permuted batch's full forward over them)."""
    with torch.no_grad():
        state = {}
        _decode(module, x[:split], 0, state)
        module.reorder_incremental_state(state, order)
        continued = torch.cat([module(x[t:t + 1, order], None, None, incremental_state=state)[0]
                               for t in range(split, len(x))])
        return continued, module(x[:, order], None, None)[0][split:]


def _phi(module, proj, x):
    """(time, batch, .) -> phi(proj(x)): (batch, heads, time, features), written out."""
    y = proj(x).view(x.size(0), x.size(1), module.num_heads, module.head_dim).permute(1, 2, 0, 3)
    return module.feature_map(y)


def _values(module, x):
    return module.v_proj(x).view(x.size(0), x.size(1), module.num_heads, module.head_dim).permute(1, 2, 0, 3)


def _out(module, heads_out):
    time, batch = heads_out.size(2), heads_out.size(0)
    return module.out_proj(heads_out.permute(2, 0, 1, 3).reshape(time, batch, module.embed_dim))


@pytest.mark.parametrize("feature_map", ["t2r", "elu"])
def test_self_attention_is_the_textbook_form(feature_map):
    attn = _randomize(T2RSelfAttention(16, 2, feature_map=feature_map, feature_dim=4).double())
    x = _x(time=20)
    ref, _ = la.naive_causal_linear_attention(_phi(attn, attn.q_proj, x), _phi(attn, attn.k_proj, x), _values(attn, x))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, x, x)[0], _out(attn, ref), rtol=1e-10, atol=1e-10)


def test_self_attention_state_is_packed_batch_first():
    """After a prompt, the one tensor in the buffer is [S | z] of the prompt's keys and values."""
    attn = _randomize(T2RSelfAttention(16, 2, feature_dim=4).double())
    x = _x(time=9, batch=3)
    state = {}
    with torch.no_grad():
        attn(x, x, x, incremental_state=state)
    buffer = attn._get_input_buffer(state)
    assert list(buffer) == ["state"]
    k, v = _phi(attn, attn.k_proj, x), _values(attn, x)
    expected = la.pack_state((k.transpose(-1, -2) @ v, k.sum(2)))
    assert buffer["state"].shape == (3, 2, 4, 8 + 1)
    torch.testing.assert_close(buffer["state"], expected, rtol=1e-10, atol=1e-10)


def test_cross_attention_state_is_packed_and_padding_adds_nothing():
    attn = _randomize(T2RCrossAttention(16, 2, kdim=12, vdim=12, feature_dim=4).double())
    src = _x(time=7, batch=2, dim=12, seed=2)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, :3] = True  # row 1: left-padded, 4 real source positions
    q = _x(time=5, batch=2, seed=3)
    state = {}
    with torch.no_grad():
        out, _ = attn(q, src, src, key_padding_mask=padding, incremental_state=state)
        # The state is read from incremental_state from now on: the source is not looked at again.
        again, _ = attn(q, torch.randn_like(src), torch.randn_like(src), key_padding_mask=padding,
                        incremental_state=state)
        alone, _ = attn(q[:, 1:], src[3:, 1:], src[3:, 1:])
    torch.testing.assert_close(again, out, rtol=0, atol=0)
    torch.testing.assert_close(out[:, 1:], alone, rtol=1e-10, atol=1e-10)
    k = _phi(attn, attn.k_proj, src).masked_fill(padding[:, None, :, None], 0.0)
    v = _values(attn, src)
    saved = attn._get_input_buffer(state)
    assert list(saved) == ["state"] and saved["state"].shape == (2, 2, 4, 8 + 1)
    torch.testing.assert_close(saved["state"], la.pack_state((k.transpose(-1, -2) @ v, k.sum(2))),
                               rtol=1e-10, atol=1e-10)
    # Every query reads the whole source: softmax-free attention weights phi(q).phi(k).
    weights = _phi(attn, attn.q_proj, q) @ k.transpose(-1, -2)
    ref = (weights @ v) / (weights.sum(-1, keepdim=True) + la.DEFAULT_EPS)
    torch.testing.assert_close(out, _out(attn, ref), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("role,order", [
    ("self", [2, 0, 3, 3]),  # beam search also duplicates rows
    ("cross", [1, 1, 2, 3]),  # 2 sentences x 2 beams, each beam from one of its sentence's: skipped
    ("cross", [2, 3]),  # the first sentence finished: the batch shrinks, the state is selected
])
def test_reorder_equals_the_permuted_batch(role, order):
    torch.manual_seed(0)
    attn = (T2RSelfAttention(16, 2, feature_dim=4) if role == "self"
            else T2RCrossAttention(16, 2, kdim=12, vdim=12, feature_dim=4)).double().eval()
    x, src = _x(time=10, batch=4), _x(time=6, batch=2, dim=12, seed=2).repeat_interleave(2, dim=1)
    order = torch.tensor(order)

    def run(x, src, state, times):
        kv = (x, x) if role == "self" else (src, src)
        return torch.cat([attn(x[t:t + 1], *kv, incremental_state=state)[0] for t in times])

    with torch.no_grad():
        state = {}
        run(x, src, state, range(5))
        attn.reorder_incremental_state(state, order)
        continued = run(x[:, order], src[:, order], state, range(5, 10))
        reference = run(x[:, order], src[:, order], {}, range(10))[5:]
    torch.testing.assert_close(continued, reference, rtol=1e-10, atol=1e-10)


def outputs_and_gradients(module, x):
    """[output, d loss/d x, d loss/d each parameter] for a loss that weighs every output differently."""
    xi = x.clone().requires_grad_()
    out, _ = module(xi, xi, xi)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return [out.detach(), xi.grad] + [p.grad for p in module.parameters()]


def test_training_forward_and_gradients_equal():
    folded, plain = _pair()
    x = _x()
    for a, b in zip(outputs_and_gradients(folded, x), outputs_and_gradients(plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_inference_full_and_incremental_equal():
    folded, plain = _pair()
    x = _x(time=20)
    with torch.no_grad():
        full = plain(x, x, x)[0]
        torch.testing.assert_close(folded(x, x, x)[0], full, rtol=1e-10, atol=1e-10)
        for prefix in (0, 1, 12):
            torch.testing.assert_close(_decode(folded, x, prefix), full, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(_decode(plain, x, prefix), full, rtol=1e-10, atol=1e-10)


def test_prompt_in_blocks_equals_one_prompt():
    """Multi-token incremental calls continue the saved state: a long input read block by block
    (stream scoring, chunked prefill) is one input read at once."""
    attn, _ = _pair()
    x = _x(time=150)
    with torch.no_grad():
        state = {}
        blocks = torch.cat([attn(x[s:s + 40], x[s:s + 40], x[s:s + 40], incremental_state=state)[0]
                            for s in range(0, 150, 40)])
        torch.testing.assert_close(blocks, attn(x, x, x)[0], rtol=1e-10, atol=1e-10)


def test_new_decoding_run_sees_changed_weights():
    # fairseq's optimizers write through .data, which no version counter sees: the fold must
    # come from the weights as they are when a run starts.
    folded, plain = _pair()
    x = _x(time=6)
    with torch.no_grad():
        _decode(folded, x, 2)
        for module in (folded, plain):
            module.feature_map.weight.data.mul_(1.5)
            module.q_proj.bias.data.add_(0.3)
            module.v_proj.weight.data.mul_(0.5)
        torch.testing.assert_close(_decode(folded, x, 2), plain(x, x, x)[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(folded(x, x, x)[0], plain(x, x, x)[0], rtol=1e-10, atol=1e-10)


def test_whole_model_equal_with_and_without_folding():
    model, _ = build_model("t2r_lm", TINY_LM)
    plain = copy.deepcopy(model)
    for layer in plain.decoder.layers:
        folded = layer.self_attn
        layer.self_attn = T2RSelfAttention(32, 4, feature_dim=8, fold_feature_map=False)
        layer.self_attn.load_state_dict(folded.state_dict())
    tokens = torch.randint(4, 60, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(tokens)[0], plain.decoder(tokens)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("role", ["self", "cross"])
def test_parameter_names_and_packed_in_proj_upgrade(role):
    """fairseq's names (a softmax checkpoint loads by name) plus the feature map; fairseq's old
    single in_proj matrix is split on load."""
    attn = T2RSelfAttention(16, 2, feature_dim=4) if role == "self" else T2RCrossAttention(16, 2, feature_dim=4)
    assert set(attn.state_dict()) == {f"{p}.{kind}" for p in ("q_proj", "k_proj", "v_proj", "out_proj", "feature_map")
                                      for kind in ("weight", "bias")}
    source = _randomize(copy.deepcopy(attn), seed=5).state_dict()
    old = {f"layer.{name}": t for name, t in source.items() if not name.startswith(("q_", "k_", "v_"))}
    for kind in ("weight", "bias"):
        old[f"layer.in_proj_{kind}"] = torch.cat([source[f"{p}_proj.{kind}"] for p in "qkv"])
    attn.upgrade_state_dict_named(old, "layer")
    attn.load_state_dict({name[len("layer."):]: t for name, t in old.items()})
    for name, t in attn.state_dict().items():
        assert torch.equal(t, source[name]), name
