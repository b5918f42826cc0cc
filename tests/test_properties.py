"""Property-based tests (hypothesis): the chunked form equals the naive reference over random
shapes, chunk sizes, padding and initial states; long sequences and bf16 stay finite."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from t2r_fairseq.linear_attention import (causal_linear_attention, linear_attention_step,
                                          naive_causal_linear_attention)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 3), time=st.integers(0, 150), feat=st.integers(1, 9),
       dim=st.integers(1, 9), chunk=st.sampled_from([1, 2, 7, 16, 64, 200]), with_state=st.booleans(),
       pad=st.integers(0, 10), seed=st.integers(0, 2 ** 16))
def test_chunked_equals_naive(batch, heads, time, feat, dim, chunk, with_state, pad, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(batch, heads, time, feat, generator=g, dtype=torch.float64)
    k = torch.rand(batch, heads, time, feat, generator=g, dtype=torch.float64)
    v = torch.randn(batch, heads, time, dim, generator=g, dtype=torch.float64)
    if pad and time:  # padded keys (zeroed features, as the attention module does) contribute nothing
        k[:, :, :min(pad, time)] = 0
    state = None
    if with_state:
        state = (torch.randn(batch, heads, feat, dim, generator=g, dtype=torch.float64),
                 torch.rand(batch, heads, feat, generator=g, dtype=torch.float64))
    out, (s, z) = causal_linear_attention(q, k, v, initial_state=state, chunk_size=chunk)
    ref, (s_ref, z_ref) = naive_causal_linear_attention(q, k, v, initial_state=state)
    assert out.shape == (batch, heads, time, dim)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s, s_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-9)


@settings(max_examples=25, deadline=None)
@given(split=st.integers(0, 90), chunk=st.sampled_from([3, 16, 64]), seed=st.integers(0, 2 ** 16))
def test_any_prefix_split_then_steps_equals_whole(split, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(1, 2, 90, 4, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, 2, 90, 3, generator=g, dtype=torch.float64)
    whole, _ = causal_linear_attention(q, k, v, chunk_size=chunk)
    prefix, state = causal_linear_attention(q[:, :, :split], k[:, :, :split], v[:, :, :split], chunk_size=chunk)
    outs = [prefix]
    for t in range(split, 90):
        out, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 2), whole, rtol=1e-9, atol=1e-9)


# float16 runs on CPU too: its narrow range (max 65504) is what a float32 state must protect.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sixteen_thousand_tokens_stay_finite_and_bounded(dtype):
    """The normalizer z grows linearly with length; S and z live in float32, and the output, a
    weighted average of values, stays within their range at every position."""
    g = torch.Generator().manual_seed(0)
    t = 16384
    q = torch.rand(1, 2, t, 16, generator=g).to(dtype)
    k = torch.rand(1, 2, t, 16, generator=g).to(dtype)
    v = (torch.rand(1, 2, t, 8, generator=g) * 2 - 1).to(dtype)
    out, (s, z) = causal_linear_attention(q, k, v)
    assert out.dtype == dtype and s.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(s).all() and torch.isfinite(z).all()
    assert out.float().abs().max() <= 1.0 + 1e-2
    # Stepping on from the end of the parallel pass agrees with it.
    step, _ = linear_attention_step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:],
                                    causal_linear_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1])[1])
    torch.testing.assert_close(step.float(), out[:, :, -1:].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sixteen_thousand_decode_steps_stay_finite(dtype):
    """16k generation steps through the attention module's incremental path (what fairseq's
    decoder calls per token): the output stays finite and within the values' range, the state
    stays float32, and the last step agrees with the parallel form over the whole sequence."""
    from t2r_fairseq.attention import T2RSelfAttention

    torch.manual_seed(0)
    attn = T2RSelfAttention(16, 2, feature_dim=4).eval().to(dtype)  # tiny: the test is about numerics
    steps = 16384
    x = torch.randn(steps, 1, 16).to(dtype)
    state = {}
    with torch.no_grad():
        for t in range(steps):
            out, _ = attn(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)
        full, _ = attn(x, x, x)
    assert torch.isfinite(out.float()).all()
    packed = attn._get_input_buffer(state)["state"]
    assert packed.dtype == torch.float32 and torch.isfinite(packed).all()
    torch.testing.assert_close(out.float(), full[-1:].float(), rtol=3e-2, atol=3e-2)
