"""The three forms of causal linear attention agree (values and gradients, float64)."""
import importlib.util
import pathlib

import pytest
import torch

# Pure torch: load the module by path so these tests do not need fairseq.
_spec = importlib.util.spec_from_file_location(
    "linear_attention", pathlib.Path(__file__).parents[1] / "t2r_fairseq" / "linear_attention.py")
la = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(la)


def _inputs(batch, heads, time, feat, dim, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, heads, time, feat, generator=g, dtype=dtype)
    k = torch.rand(batch, heads, time, feat, generator=g, dtype=dtype)
    v = torch.randn(batch, heads, time, dim, generator=g, dtype=dtype)
    return q, k, v


def _state(batch, heads, feat, dim, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, heads, feat, dim, generator=g, dtype=torch.float64),
            torch.rand(batch, heads, feat, generator=g, dtype=torch.float64) * 5)


@pytest.mark.parametrize("time", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_recurrent_naive_agree(time, with_state):
    q, k, v = _inputs(2, 3, time, 5, 4)
    state = _state(2, 3, 5, 4) if with_state else None
    out_n, (s_n, z_n) = la.naive_causal_linear_attention(q, k, v, initial_state=state)
    for fn, kw in ((la.causal_linear_attention, {"chunk_size": 64}),
                   (la.causal_linear_attention, {"chunk_size": 16}),
                   (la.recurrent_linear_attention, {})):
        out, (s, z) = fn(q, k, v, initial_state=state, **kw)
        torch.testing.assert_close(out, out_n, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s, s_n, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(z, z_n, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("time", [1, 65, 257])
def test_gradients_agree(time):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, time, 4, 3))
    s0, z0 = (t.requires_grad_() for t in _state(1, 2, 4, 3))
    grads = []
    for fn in (la.naive_causal_linear_attention, la.causal_linear_attention, la.recurrent_linear_attention):
        out, (s, z) = fn(q, k, v, initial_state=(s0, z0))
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + s.sum() + z.sum()
        grads.append(torch.autograd.grad(loss, (q, k, v, s0, z0)))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_prefix_then_steps_equals_whole():
    q, k, v = _inputs(2, 2, 100, 8, 6, dtype=torch.float32)
    whole, _ = la.causal_linear_attention(q, k, v)
    prefix, state = la.causal_linear_attention(q[:, :, :70], k[:, :, :70], v[:, :, :70])
    outs = [prefix]
    for t in range(70, 100):
        out, state = la.linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-5, atol=1e-5)


def test_state_is_float32_under_half_precision_and_output_keeps_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in _inputs(1, 2, 130, 4, 4, dtype=torch.float32))
    out, (s, z) = la.causal_linear_attention(q, k, v)
    assert out.dtype == torch.bfloat16 and s.dtype == torch.float32 and z.dtype == torch.float32
    ref, _ = la.naive_causal_linear_attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


def test_all_zero_features_give_zero_not_nan():
    q, k, v = _inputs(1, 1, 10, 4, 3, dtype=torch.float32)
    out, _ = la.causal_linear_attention(torch.zeros_like(q), k, v)
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("inplace", [False, True])
def test_packed_step_equals_naive(inplace):
    """The decode step on [S | z] with v1 = [v | 1]; in place, it writes into the given state."""
    q, k, v = _inputs(2, 3, 1, 5, 4)
    state = _state(2, 3, 5, 4)
    out_n, final_n = la.naive_causal_linear_attention(q, k, v, initial_state=state)
    packed = la.pack_state(state)
    out, new = la.packed_linear_attention_step(q, k, la.with_ones_column(v), packed, inplace=inplace)
    assert (new is packed) == inplace
    torch.testing.assert_close(out, out_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new, la.pack_state(final_n), rtol=1e-12, atol=1e-12)


def test_cross_attention_state_matches_full_read():
    q, k, v = _inputs(2, 2, 9, 4, 3, dtype=torch.float64)
    out = la.packed_linear_attention_read(q, la.packed_linear_attention_state(k, la.with_ones_column(v)))
    weights = q @ k.transpose(-1, -2)
    expected = (weights @ v) / (weights.sum(-1, keepdim=True) + la.DEFAULT_EPS)
    torch.testing.assert_close(out, expected.to(out.dtype), rtol=1e-6, atol=1e-6)
