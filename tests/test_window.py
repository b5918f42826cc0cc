"""Sliding-window softmax + linear attention (--t2r-window W).

The math: the chunked form, the step-by-step form and the naive quadratic reference agree (values,
final states and gradients, float64) for lengths around W and the chunk size, W = 1 and W >= length,
with and without decay and an initial state; with W >= length it is causal softmax attention; padding
enters no window, ring or state; 16k tokens stay finite and exact in float32 and bfloat16."""
import math

import pytest
import torch

from t2r_fairseq import linear_attention as la
from t2r_fairseq import window_attention as wa
from test_decay import _log_gates


def _window_inputs(batch, heads, time, head_dim=4, feat=3, seed=0, dtype=torch.float64, scale=1.0):
    """Raw queries and keys (any sign), values with their column of ones, non-negative features."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, time, head_dim, generator=g, dtype=dtype) * scale for _ in range(2))
    v1 = la.with_ones_column(torch.randn(batch, heads, time, head_dim, generator=g, dtype=dtype))
    phi_q, phi_k = (torch.rand(batch, heads, time, feat, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v1, phi_q, phi_k


def _balance(heads, seed=3):
    return torch.randn(heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _prefix_state(kind, window, decay, heads=2):
    """An initial state left by a padded prefix: none, one shorter than W (ring not full), or longer."""
    if kind == "none":
        return None
    time = {"short": 3, "long": 37}[kind]
    inputs = _window_inputs(2, heads, time, seed=7)
    padding = torch.zeros(2, time, dtype=torch.bool)
    padding[1, :2] = True  # rows with different key counts: different ring slots
    log_g = _log_gates(2, heads, time, "position", seed=8) if decay else None
    return wa.packed_window_attention(*inputs, window=window, log_balance=_balance(heads), log_g=log_g,
                                      padding=padding, chunk_size=16)[1]


def _filled(state):
    """The ring with its empty slots zeroed: what they hold (the step form ages them too) is never read."""
    window = state.ring.size(2)
    return state.ring * (torch.arange(window) < state.count[:, None])[:, None, :, None]


def _assert_states_equal(got, want, tol=1e-10):
    torch.testing.assert_close(got.packed, want.packed, rtol=tol, atol=tol)
    torch.testing.assert_close(_filled(got), _filled(want), rtol=tol, atol=tol)
    assert torch.equal(got.count, want.count)


FORMS = [(wa.packed_window_attention, {"chunk_size": 16}), (wa.packed_window_attention, {"chunk_size": 64}),
         (wa.recurrent_window_attention, {})]
LENGTHS = [(1, 1), (5, 1), (65, 1), (15, 16), (16, 16), (17, 16), (63, 16), (64, 16), (65, 16), (130, 16),
           (64, 64), (65, 64), (130, 64), (130, 40), (20, 200)]


@pytest.mark.parametrize("time,window", LENGTHS)
@pytest.mark.parametrize("prefix", ["none", "short", "long"])
@pytest.mark.parametrize("decay", [False, True])
def test_forms_agree(time, window, prefix, decay):
    inputs = _window_inputs(2, 2, time)
    state = _prefix_state(prefix, window, decay)
    log_g = _log_gates(2, 2, time, "position") if decay else None
    kwargs = dict(window=window, log_balance=_balance(2), log_g=log_g)
    ref, ref_state = wa.naive_window_attention(*inputs, initial_state=state, **kwargs)
    for fn, extra in FORMS:
        out, final = fn(*inputs, initial_state=state, **kwargs, **extra)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
        _assert_states_equal(final, ref_state)


def test_window_covering_the_input_is_causal_softmax_attention():
    q, k, v1, phi_q, phi_k = _window_inputs(2, 3, 50)
    out, _ = wa.packed_window_attention(q, k, v1, phi_q, phi_k, window=50, log_balance=_balance(3), chunk_size=16)
    scores = (q @ k.transpose(-1, -2)) / 2  # sqrt(head_dim = 4)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, -torch.inf).softmax(-1) @ v1[..., :-1]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_naive_reference_is_the_definition_written_out():
    """The oracle against one query computed by hand: W softmax scores, older keys' decayed
    linear scores times beta, one normalisation."""
    q, k, v1, phi_q, phi_k = _window_inputs(1, 1, 12)
    log_g, balance, i, window = _log_gates(1, 1, 12, "position"), _balance(1), 11, 4
    out, _ = wa.naive_window_attention(q, k, v1, phi_q, phi_k, window=window, log_balance=balance, log_g=log_g)
    c = log_g[0, 0].cumsum(0)
    weights = [math.exp(q[0, 0, i] @ k[0, 0, j] / 2) if i - j < window
               else balance.exp().item() * math.exp(c[i] - c[j]) * float(phi_q[0, 0, i] @ phi_k[0, 0, j])
               for j in range(i + 1)]
    expected = sum(w * v1[0, 0, j, :-1] for j, w in enumerate(weights)) / sum(weights)
    torch.testing.assert_close(out[0, 0, i], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("time,window", [(65, 16), (40, 1), (30, 64)])
def test_gradients_agree(time, window):
    inputs = [t.requires_grad_() for t in _window_inputs(2, 2, time)]
    log_g = _log_gates(2, 2, time, "position").requires_grad_()
    balance = _balance(2).requires_grad_()
    state = _prefix_state("long", window, True)
    grads = []
    for fn, extra in [(wa.naive_window_attention, {})] + FORMS:
        out, final = fn(*inputs, window=window, log_balance=balance, log_g=log_g, initial_state=state, **extra)
        loss = ((out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum()
                + final.packed.sum() + final.ring.sum())
        grads.append(list(torch.autograd.grad(loss, (*inputs, log_g, balance))))
        grads[-1][2] = grads[-1][2][..., :-1]  # v1's column of ones is ones by contract: only the naive ignores it
    assert all(g.abs().sum() > 0 for g in grads[0])  # every input, the gates and the balance learn
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("split", [0, 3, 16, 40, 70])
@pytest.mark.parametrize("padding", [0, 5])
@pytest.mark.parametrize("decay", [False, True])
def test_pieces_equal_whole(split, padding, decay):
    """chunked([a | b]) == chunked(a), then chunked(b) from its state; `padding` padded positions at
    a's end (a stream's last block) change neither a's outputs nor the state b continues from."""
    window, time = 16, 70
    inputs = _window_inputs(2, 2, time)
    log_g = _log_gates(2, 2, time, "position") if decay else None
    kwargs = dict(window=window, log_balance=_balance(2), chunk_size=16)
    whole, whole_state = wa.packed_window_attention(*inputs, log_g=log_g, **kwargs)
    junk = _window_inputs(2, 2, padding, seed=9)
    first = [torch.cat([t[:, :, :split], j], dim=2) for t, j in zip(inputs, junk)]
    first_g = None if log_g is None else torch.cat([log_g[:, :, :split], log_g.new_full((2, 2, padding), -1.0)], 2)
    pad = torch.zeros(2, split + padding, dtype=torch.bool)
    pad[:, split:] = True
    out_a, state = wa.packed_window_attention(*first, log_g=first_g, padding=pad, **kwargs)
    out_b, final = wa.packed_window_attention(*(t[:, :, split:] for t in inputs), initial_state=state,
                                              log_g=None if log_g is None else log_g[:, :, split:], **kwargs)
    torch.testing.assert_close(torch.cat([out_a[:, :, :split], out_b], dim=2), whole, rtol=1e-10, atol=1e-10)
    _assert_states_equal(final, whole_state)


@pytest.mark.parametrize("decay", [False, True])
def test_left_padding_changes_no_output_nor_state(decay):
    inputs = _window_inputs(1, 2, 40)
    log_g = _log_gates(1, 2, 40, "position") if decay else None
    kwargs = dict(window=16, log_balance=_balance(2), chunk_size=16)
    out, state = wa.packed_window_attention(*inputs, log_g=log_g, **kwargs)
    padded = [torch.cat([j * 100, t], dim=2) for t, j in zip(inputs, _window_inputs(1, 2, 7, seed=9))]
    padded_g = None if log_g is None else torch.cat([log_g.new_full((1, 2, 7), -2.0), log_g], dim=2)
    pad = torch.arange(47)[None] < 7
    out_p, state_p = wa.packed_window_attention(*padded, log_g=padded_g, padding=pad, **kwargs)
    torch.testing.assert_close(out_p[:, :, 7:], out, rtol=1e-10, atol=1e-10)
    _assert_states_equal(state_p, state)


@pytest.mark.parametrize("inplace", [False, True])
def test_padded_step_changes_nothing_and_inplace_step_allocates_no_state(inplace):
    inputs = _window_inputs(2, 2, 30)
    log_g = _log_gates(2, 2, 30, "position")
    kwargs = dict(window=8, log_balance=_balance(2))
    _, state = wa.packed_window_attention(*(t[:, :, :29] for t in inputs), log_g=log_g[:, :, :29], **kwargs)
    before = wa.WindowState(*(t.clone() for t in state))
    step = [t[:, :, 29:] for t in inputs]
    out, new = wa.packed_window_attention_step(*step, state, log_g=log_g[:, :, 29:],
                                               padding=torch.tensor([[False], [True]]), inplace=inplace, **kwargs)
    assert all((a is b) == inplace for a, b in zip(new, state))
    for a, b in zip(new, before):
        assert torch.equal(a[1], b[1])  # the padded row
    ref, ref_state = wa.naive_window_attention(*(t[:1] for t in step), initial_state=wa.WindowState(
        *(t[:1] for t in before)), log_g=log_g[:1, :, 29:], **kwargs)
    torch.testing.assert_close(out[:1], ref, rtol=1e-12, atol=1e-12)
    _assert_states_equal(wa.WindowState(*(t[:1] for t in new)), ref_state, tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sixteen_thousand_tokens_stay_finite_and_exact(dtype):
    """Scores beyond +-88 (exp of them overflows float32 unshifted), the linear normalizer summing 16k
    keys, strong varied decay on one head and none on the other: the output and state equal float64's
    on the same inputs, and a decode step continues the parallel pass."""
    time = 16384
    q, k, v1, phi_q, phi_k = (t.to(dtype) for t in _window_inputs(1, 2, time, head_dim=8, feat=8, scale=5.0,
                                                                  dtype=torch.float32))
    assert ((q[:, :, 1:] * k[:, :, 1:]).float().sum(-1) / 8 ** 0.5).abs().max() > 88
    log_g = torch.stack([-5 * torch.rand(time, generator=torch.Generator().manual_seed(0)), torch.zeros(time)])[None]
    kwargs = dict(window=64, log_balance=torch.tensor([-2.0, 1.0]), log_g=log_g)
    out, state = wa.packed_window_attention(q, k, v1, phi_q, phi_k, **kwargs)
    assert out.dtype == dtype and state.packed.dtype == torch.float32
    assert torch.isfinite(out.float()).all() and torch.isfinite(state.packed).all()
    as64 = [t.double() for t in (q, k, v1, phi_q, phi_k)]
    ref, ref_state = wa.packed_window_attention(*as64, **{**kwargs, "log_g": log_g.double()})
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.packed.double(), ref_state.packed, rtol=1e-4, atol=1e-4)
    _, before = wa.packed_window_attention(*(t[:, :, :-1] for t in (q, k, v1, phi_q, phi_k)),
                                           **{**kwargs, "log_g": log_g[:, :, :-1]})
    step, _ = wa.packed_window_attention_step(*(t[:, :, -1:] for t in (q, k, v1, phi_q, phi_k)), before,
                                              **{**kwargs, "log_g": log_g[:, :, -1:]})
    torch.testing.assert_close(step.double(), ref[:, :, -1:], rtol=tol, atol=tol)
