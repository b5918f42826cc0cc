"""The delta rule's math (t2r_fairseq/delta_rule.py): chunked (WY form), one step and the naive
per-token recurrence agree in values and gradients, in float64, at odd lengths, with and without
gates and initial states; padding enters no state; a key written twice is overwritten, not summed;
long inputs stay finite in float32 and bfloat16."""
import pytest
import torch

from t2r_fairseq.delta_rule import chunked_delta_rule, delta_rule_step, naive_delta_rule


def _inputs(time, *, gated, initial, dtype=torch.float64, batch=2, heads=3, dk=8, dv=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, time, dk, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(batch, heads, time, dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(batch, heads, time, dv, generator=g, dtype=dtype)
    beta = torch.rand(batch, heads, time, generator=g, dtype=dtype)
    log_g = -0.3 * torch.rand(batch, heads, time, generator=g, dtype=dtype) if gated else None
    state = torch.randn(batch, heads, dk, dv, generator=g, dtype=dtype) if initial else None
    return q, k, v, beta, log_g, state


def _stepwise(q, k, v, beta, log_g, state):
    outs = []
    for t in range(q.size(2)):
        out, state = delta_rule_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], beta[:, :, t:t + 1], state,
                                     log_g=None if log_g is None else log_g[:, :, t:t + 1])
        outs.append(out)
    return torch.cat(outs, dim=2), state


CASES = [(time, gated, initial) for time in (1, 63, 64, 65, 257) for gated in (False, True) for initial in (False, True)]


@pytest.mark.parametrize("time,gated,initial", CASES)
def test_chunked_and_step_equal_the_naive_recurrence(time, gated, initial):
    q, k, v, beta, log_g, state = _inputs(time, gated=gated, initial=initial)
    reference = naive_delta_rule(q, k, v, beta, initial_state=state, log_g=log_g)
    for chunk in (16, 64):
        out, final = chunked_delta_rule(q, k, v, beta, initial_state=state, log_g=log_g, chunk_size=chunk)
        torch.testing.assert_close(out, reference[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(final, reference[1], rtol=1e-10, atol=1e-10)
    out, final = _stepwise(q, k, v, beta, log_g, state)
    torch.testing.assert_close(out, reference[0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, reference[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gated", [False, True])
def test_gradients_agree(gated):
    inputs = [t.requires_grad_() if t is not None else None for t in _inputs(70, gated=gated, initial=True)]

    def grads(form):
        for t in inputs:
            if t is not None:
                t.grad = None
        out, final = form(*inputs)
        (out.square().sum() + final.sin().sum()).backward()
        return [t.grad.clone() for t in inputs if t is not None]

    q, k, v, beta, log_g, state = inputs
    naive = grads(lambda q, k, v, b, a, s: naive_delta_rule(q, k, v, b, initial_state=s, log_g=a))
    chunked = grads(lambda q, k, v, b, a, s: chunked_delta_rule(q, k, v, b, initial_state=s, log_g=a, chunk_size=16))
    step = grads(_stepwise)
    for a, b, c in zip(naive, chunked, step):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gated", [False, True])
def test_padding_enters_no_state(gated):
    """b = 0 and a = 0 at padded positions: the state after a padded input is the unpadded one's."""
    q, k, v, beta, log_g, state = _inputs(40, gated=gated, initial=True)
    padded = torch.zeros(40, dtype=torch.bool)
    padded[[0, 7, 8, 39]] = True
    beta_p = beta.masked_fill(padded, 0.0)
    log_g_p = None if log_g is None else log_g.masked_fill(padded, 0.0)
    out, final = chunked_delta_rule(q, k, v, beta_p, initial_state=state, log_g=log_g_p, chunk_size=16)
    keep = ~padded
    ref_out, ref_final = naive_delta_rule(q[:, :, keep], k[:, :, keep], v[:, :, keep], beta[:, :, keep],
                                          initial_state=state, log_g=None if log_g is None else log_g[:, :, keep])
    torch.testing.assert_close(final, ref_final, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[:, :, keep], ref_out, rtol=1e-10, atol=1e-10)


def test_a_key_written_twice_holds_the_new_value_not_the_sum():
    """What an additive state cannot do: with b = 1, writing v2 under the key that holds v1 replaces it."""
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, 8, dtype=torch.float64), dim=-1).expand(1, 1, 2, 8)
    v = torch.tensor([[[[1.0, 2.0], [5.0, -3.0]]]], dtype=torch.float64)
    out, state = chunked_delta_rule(k, k, v, torch.ones(1, 1, 2, dtype=torch.float64))
    torch.testing.assert_close(out[0, 0, 1], v[0, 0, 1])
    torch.testing.assert_close(k[0, 0, 0] @ state[0, 0], v[0, 0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_inputs_stay_finite_and_bounded(dtype):
    """Unit keys and b in (0, 1) make every step a contraction: 16k positions leave a bounded state."""
    q, k, v, beta, log_g, _ = _inputs(16384, gated=True, initial=False, dtype=dtype, batch=1, heads=2, seed=3)
    out, state = chunked_delta_rule(q, k, v, beta, log_g=log_g)
    assert state.dtype == torch.float32 and out.dtype == dtype
    assert torch.isfinite(out.float()).all() and torch.isfinite(state).all()
    assert state.abs().max() < 100 and out.float().abs().max() < 1000


# -- the delta rule as T2R self-attention (--t2r-update delta) -------------------------------------
def test_padded_positions_write_nothing_into_a_delta_state():
    """Left padding (generation with prefixes): the real tokens' outputs and the final state are the
    unpadded input's, with gated decay too."""
    from helpers import TINY_LM, build_model

    model, _ = build_model("t2r_lm", TINY_LM + ["--t2r-update", "delta", "--t2r-decay", "gated"])
    attn = model.decoder.layers[0].self_attn
    torch.nn.init.normal_(attn.write_strength.weight, std=0.1)  # positions write with different strengths
    x = torch.randn(8, 1, 32)
    xp = torch.cat([torch.randn(3, 1, 32), x], dim=0)
    padding = torch.tensor([[True] * 3 + [False] * 8])
    with torch.no_grad():
        state, state_p = {}, {}
        out, _ = attn(x, x, x, incremental_state=state)
        out_p, _ = attn(xp, xp, xp, key_padding_mask=padding, incremental_state=state_p)
    torch.testing.assert_close(out_p[3:], out, rtol=1e-5, atol=1e-5)
    saved, saved_p = (attn._get_input_buffer(s)["state"] for s in (state, state_p))
    torch.testing.assert_close(saved_p, saved, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("update", ["delta", "delta_norm"])
def test_conversion_names_the_write_strengths(update):
    from helpers import TINY_LM, TINY_LM_SOFTMAX, build_model

    from t2r_fairseq.transfer import transfer_softmax_weights

    teacher, _ = build_model("transformer_lm", TINY_LM_SOFTMAX)
    student, _ = build_model("t2r_lm", TINY_LM + ["--t2r-update", update])
    new = transfer_softmax_weights(student, teacher.state_dict())
    names = {f"decoder.layers.{i}.self_attn.{name}.{p}" for i in range(2)
             for name in ("feature_map", "write_strength") for p in ("weight", "bias")}
    if update == "delta_norm":  # DeltaNet's read-out norm, a gain per head dimension
        names |= {f"decoder.layers.{i}.self_attn.readout_norm.weight" for i in range(2)}
    assert set(new) == names


def test_delta_norm_reads_out_at_the_norms_scale():
    # DeltaNet's read-out: each head's output has RMS = the norm's gain (1 at first), whatever the
    # values' scale; T2R's normaliser instead keeps the values' scale.
    from helpers import TINY_LM, build_model

    model, _ = build_model("t2r_lm", TINY_LM + ["--t2r-update", "delta_norm"])
    attn = model.decoder.layers[0].self_attn
    x = torch.randn(7, 2, attn.embed_dim)
    heads = {}
    attn.out_proj.register_forward_hook(lambda m, inputs, out: heads.setdefault("in", inputs[0]))
    with torch.no_grad():
        attn.v_proj.weight.mul_(100.0)
        attn(x)
    per_head = heads["in"].view(7, 2, attn.num_heads, attn.head_dim)
    rms = per_head.pow(2).mean(-1).sqrt()
    reading = rms > 0  # a query whose relu features are all off reads nothing: S q = 0
    assert reading.float().mean() > 0.8
    torch.testing.assert_close(rms[reading], torch.ones_like(rms[reading]), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("flags,expect", [
    (["--t2r-update", "delta", "--t2r-window", 4], "--t2r-update delta with --t2r-window 4"),
    (["--t2r-update", "delta", "--t2r-softmax-layers", "0,1"], "--t2r-update delta sets how T2R self-attention"),
    (["--t2r-update", "delta_norm", "--t2r-window", 4], "--t2r-update delta_norm with --t2r-window 4"),
])
def test_bad_combinations_are_one_line(flags, expect):
    from helpers import TINY_LM, build_model

    from t2r_fairseq.options import T2ROptionError

    with pytest.raises(T2ROptionError, match=expect):
        build_model("t2r_lm", TINY_LM + flags)
