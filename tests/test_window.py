"""Sliding-window softmax + linear attention (--t2r-window W).

The math: the chunked form, the step-by-step form and the naive quadratic reference agree (values,
final states and gradients, float64) for lengths around W and the chunk size, W = 1 and W >= length,
with and without decay and an initial state; with W >= length it is causal softmax attention; padding
enters no window, ring or state; 16k tokens stay finite and exact in float32 and bfloat16. The module
and whole decoders: the textbook form, the softmax teacher when the window covers the input, decoding
token by token (and after a prefill) equals the full forward for every feature map, hybrids and decay,
the ring grows like a key/value cache to W slots, then stays, beam reordering equals the permuted
batch, padding changes nothing.
Options and conversion: the balances are named as new; bad values are one line."""
import math
import re

import pytest
import torch

from helpers import (MODEL, TINY_LM, TINY_LM_SOFTMAX, TINY_MT, TRAIN, USER_DIR, build_model, conversion_log, converter_log,
                     run, save_checkpoint)
from t2r_fairseq import linear_attention as la
from t2r_fairseq import window_attention as wa
from t2r_fairseq.attention import T2RSelfAttention, prefill
from test_attention import _decode, _out, _randomize, decode_reordered, outputs_and_gradients
from test_decay import _expected_log_gates, _heads, _log_gates, _x
from test_models import _incremental, _left_padded_sources, _log_probs, _targets, _tokens, decoder_reordered


def _window_inputs(batch, heads, time, head_dim=4, feat=3, seed=0, dtype=torch.float64, scale=1.0):
    """(phi_q, phi_k, v1, q, k), the forms' leading arguments: non-negative features, values with their
    column of ones, raw queries and keys (any sign)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(batch, heads, time, head_dim, generator=g, dtype=dtype) * scale for _ in range(2))
    v1 = la.with_ones_column(torch.randn(batch, heads, time, head_dim, generator=g, dtype=dtype))
    phi_q, phi_k = (torch.rand(batch, heads, time, feat, generator=g, dtype=dtype) for _ in range(2))
    return phi_q, phi_k, v1, q, k


def _balance(heads, seed=3):
    return torch.randn(heads, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _prefix_state(kind, window, decay, heads=2):
    """An initial state left by a padded prefix: none, one shorter than W (ring not full), or longer."""
    if kind == "none":
        return None
    time = {"short": 3, "long": 37}[kind]
    inputs = _window_inputs(2, heads, time, seed=7)
    padding = torch.zeros(2, time, dtype=torch.bool)
    padding[1, :2] = True  # rows with different key counts: a ring with empty slots
    log_g = _log_gates(2, heads, time, "position", seed=8) if decay else None
    return wa.window_attention(*inputs, window=window, log_balance=_balance(heads), log_g=log_g,
                               padding=padding, chunk_size=16)[1]


def _valid(state):
    """Which slots hold keys (None: all of them)."""
    if state.valid is None:
        return torch.ones(state.keys.size(0), state.keys.size(2), dtype=torch.bool)
    return state.valid


def _assert_states_equal(got, want, tol=1e-10):
    torch.testing.assert_close(got.packed, want.packed, rtol=tol, atol=tol)
    assert got.position == want.position and torch.equal(_valid(got), _valid(want))
    filled = _valid(got)[:, None, :, None]  # an empty slot's age is never read
    for a, b in [(got.keys, want.keys), (got.values, want.values), (got.features, want.features)]:
        torch.testing.assert_close(a * filled, b * filled, rtol=tol, atol=tol)


def _assert_same_keys(got, want, window, tol=1e-10):
    """The same [S | z] and the same keys in the ring in the same order (slots and position may differ)."""
    torch.testing.assert_close(got.packed, want.packed, rtol=tol, atol=tol)
    for a, b in zip(wa._ring_in_time_order(got, window), wa._ring_in_time_order(want, window)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


FORMS = [(wa.window_attention, {"chunk_size": 16}), (wa.window_attention, {"chunk_size": 64}),
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
    phi_q, phi_k, v1, q, k = _window_inputs(2, 3, 50)
    out, _ = wa.window_attention(phi_q, phi_k, v1, q, k, window=50, log_balance=_balance(3), chunk_size=16)
    scores = (q @ k.transpose(-1, -2)) / 2  # sqrt(head_dim = 4)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, -torch.inf).softmax(-1) @ v1[..., :-1]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_naive_reference_is_the_definition_written_out():
    """The oracle against one query computed by hand: W softmax scores, older keys' decayed
    linear scores times beta, one normalisation."""
    phi_q, phi_k, v1, q, k = _window_inputs(1, 1, 12)
    log_g, balance, i, window = _log_gates(1, 1, 12, "position"), _balance(1), 11, 4
    out, _ = wa.naive_window_attention(phi_q, phi_k, v1, q, k, window=window, log_balance=balance, log_g=log_g)
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
                + sum(t.sum() for t in final[:4]))
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
    whole, whole_state = wa.window_attention(*inputs, log_g=log_g, **kwargs)
    junk = _window_inputs(2, 2, padding, seed=9)
    first = [torch.cat([t[:, :, :split], j], dim=2) for t, j in zip(inputs, junk)]
    first_g = None if log_g is None else torch.cat([log_g[:, :, :split], log_g.new_full((2, 2, padding), -1.0)], 2)
    pad = torch.zeros(2, split + padding, dtype=torch.bool)
    pad[:, split:] = True
    out_a, state = wa.window_attention(*first, log_g=first_g, padding=pad, **kwargs)
    out_b, final = wa.window_attention(*(t[:, :, split:] for t in inputs), initial_state=state,
                                       log_g=None if log_g is None else log_g[:, :, split:], **kwargs)
    torch.testing.assert_close(torch.cat([out_a[:, :, :split], out_b], dim=2), whole, rtol=1e-10, atol=1e-10)
    _assert_same_keys(final, whole_state, window)


@pytest.mark.parametrize("decay", [False, True])
def test_left_padding_changes_no_output_nor_state(decay):
    inputs = _window_inputs(1, 2, 40)
    log_g = _log_gates(1, 2, 40, "position") if decay else None
    kwargs = dict(window=16, log_balance=_balance(2), chunk_size=16)
    out, state = wa.window_attention(*inputs, log_g=log_g, **kwargs)
    padded = [torch.cat([j * 100, t], dim=2) for t, j in zip(inputs, _window_inputs(1, 2, 7, seed=9))]
    padded_g = None if log_g is None else torch.cat([log_g.new_full((1, 2, 7), -2.0), log_g], dim=2)
    pad = torch.arange(47)[None] < 7
    out_p, state_p = wa.window_attention(*padded, log_g=padded_g, padding=pad, **kwargs)
    torch.testing.assert_close(out_p[:, :, 7:], out, rtol=1e-10, atol=1e-10)
    _assert_same_keys(state_p, state, 16)


def test_padded_step_changes_nothing_in_the_padded_row():
    inputs = _window_inputs(2, 2, 30)
    log_g = _log_gates(2, 2, 30, "position")
    kwargs = dict(window=8, log_balance=_balance(2))
    _, state = wa.window_attention(*(t[:, :, :29] for t in inputs), log_g=log_g[:, :, :29], **kwargs)
    step = [t[:, :, 29:] for t in inputs]
    out, new = wa.window_attention_step(*step, state, log_g=log_g[:, :, 29:],
                                        padding=torch.tensor([[False], [True]]), **kwargs)
    row = [wa.WindowState(*(x[1:] for x in t[:4]), t.position, None if t.valid is None else t.valid[1:])
           for t in (new, state)]
    _assert_same_keys(*row, 8, tol=0)  # the same keys, now in the slots of the positions before the new one
    ref, ref_state = wa.naive_window_attention(*(t[:1] for t in step), initial_state=wa.WindowState(
        *(x[:1] for x in state[:4]), state.position), log_g=log_g[:1, :, 29:], **kwargs)
    torch.testing.assert_close(out[:1], ref, rtol=1e-12, atol=1e-12)
    _assert_states_equal(wa.WindowState(*(x[:1] for x in new[:4]), new.position), ref_state, tol=1e-12)


@pytest.mark.parametrize("time", [3, 30])
@pytest.mark.parametrize("inplace", [False, True])
def test_step_writes_one_slot_like_a_cache(time, inplace):
    """A step with a full ring writes slot position mod W of the given tensors when in place and
    allocates no state; before W positions the ring grows by one slot, as a key/value cache does."""
    inputs = _window_inputs(2, 2, time + 1)
    kwargs = dict(window=8, log_balance=_balance(2))
    _, state = wa.window_attention(*(t[:, :, :time] for t in inputs), **kwargs)
    before = wa.WindowState(*(t.clone() for t in state[:4]), state.position)
    out, new = wa.window_attention_step(*(t[:, :, time:] for t in inputs), state, inplace=inplace, **kwargs)
    assert new.position == time + 1 and new.keys.size(2) == min(time + 1, 8)
    full = time >= 8
    assert (new.packed is state.packed) == inplace
    assert all((a is b) == (inplace and full) for a, b in zip(new[1:4], state[1:4]))
    if full:  # every slot but position mod W is as it was
        untouched = torch.arange(8) != time % 8
        assert all(torch.equal(a[:, :, untouched], b[:, :, untouched]) for a, b in zip(new[1:4], before[1:4]))
    ref, ref_state = wa.naive_window_attention(*(t[:, :, time:] for t in inputs), initial_state=before, **kwargs)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    _assert_states_equal(new, ref_state, tol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sixteen_thousand_tokens_stay_finite_and_exact(dtype):
    """Scores beyond +-88 (exp of them overflows float32 unshifted), the linear normalizer summing 16k
    keys, strong varied decay on one head and none on the other: the output and state equal float64's
    on the same inputs, and a decode step continues the parallel pass."""
    time = 16384
    phi_q, phi_k, v1, q, k = (t.to(dtype) for t in _window_inputs(1, 2, time, head_dim=8, feat=8, scale=5.0,
                                                                  dtype=torch.float32))
    assert ((q[:, :, 1:] * k[:, :, 1:]).float().sum(-1) / 8 ** 0.5).abs().max() > 88
    log_g = torch.stack([-5 * torch.rand(time, generator=torch.Generator().manual_seed(0)), torch.zeros(time)])[None]
    kwargs = dict(window=64, log_balance=torch.tensor([-2.0, 1.0]), log_g=log_g)
    out, state = wa.window_attention(phi_q, phi_k, v1, q, k, **kwargs)
    assert out.dtype == dtype and state.packed.dtype == torch.float32
    assert torch.isfinite(out.float()).all() and torch.isfinite(state.packed).all()
    as64 = [t.double() for t in (phi_q, phi_k, v1, q, k)]
    ref, ref_state = wa.window_attention(*as64, **{**kwargs, "log_g": log_g.double()})
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(state.packed.double(), ref_state.packed, rtol=1e-4, atol=1e-4)
    _, before = wa.window_attention(*(t[:, :, :-1] for t in (phi_q, phi_k, v1, q, k)),
                                    **{**kwargs, "log_g": log_g[:, :, :-1]})
    step, _ = wa.window_attention_step(*(t[:, :, -1:] for t in (phi_q, phi_k, v1, q, k)), before,
                                       **{**kwargs, "log_g": log_g[:, :, -1:]})
    torch.testing.assert_close(step.double(), ref[:, :, -1:], rtol=tol, atol=tol)


# -- the attention module ----------------------------------------------------------------------------
def _attention(window, decay="none", fold=True, feature_map="t2r", seed=0):
    """A float64 T2RSelfAttention with a window, random weights and a balance that makes both parts count."""
    torch.manual_seed(seed)
    attn = _randomize(T2RSelfAttention(16, 2, feature_dim=4, feature_map=feature_map, decay=decay, window=window,
                                       fold_feature_map=fold).double(), seed)
    with torch.no_grad():
        attn.log_balance.copy_(torch.tensor([-1.0, 1.0]))
        if decay == "gated":
            attn.decay.weight.normal_(0, 0.3)
            attn.decay.bias.fill_(1.0)
    return attn.eval()


@pytest.mark.parametrize("decay", ["none", "gated"])
def test_module_is_the_textbook_form(decay):
    attn = _attention(5, decay)
    x = _x(time=30)
    with torch.no_grad():
        q, k = _heads(attn, attn.q_proj(x)), _heads(attn, attn.k_proj(x))
        v1 = la.with_ones_column(_heads(attn, attn.v_proj(x)))
        log_g = _expected_log_gates(attn, decay, x) if decay != "none" else None
        ref, _ = wa.naive_window_attention(attn.feature_map(q), attn.feature_map(k), v1, q, k, window=5,
                                           log_balance=attn.log_balance, log_g=log_g)
        torch.testing.assert_close(attn(x, x, x)[0], _out(attn, ref), rtol=1e-10, atol=1e-10)


def test_window_covering_the_input_is_the_softmax_teacher():
    """A converted layer whose window covers the input computes fairseq's own softmax attention with
    the same projections: the window part takes the teacher's q, k, v and scaling unchanged."""
    from fairseq.modules import MultiheadAttention

    teacher = _randomize(MultiheadAttention(16, 2, self_attention=True).double())
    student = T2RSelfAttention(16, 2, feature_dim=4, window=40).double()
    student.load_state_dict({**student.state_dict(), **teacher.state_dict()})
    x = _x(time=40)
    causal = torch.full((40, 40), -torch.inf, dtype=torch.float64).triu(1)
    with torch.no_grad():
        torch.testing.assert_close(student(x, x, x)[0], teacher(x, x, x, attn_mask=causal)[0], rtol=1e-10, atol=1e-10)


def test_window_runs_the_textbook_projections():
    """The window reads the raw q and k, so the folded form would only add rows to the matmul: a
    window module never folds, and its one matmul is q, k, v (and the ones column) alone."""
    attn = _attention(6, fold=True)
    assert not attn.folded
    assert attn._build_weights()["weight"].shape == (3 * 16 + 2, 16)  # [q | k | v | 1 per head]
    x = _x()
    outputs_and_gradients(attn, x)
    assert attn.log_balance.grad.abs().min() > 0  # the balance learns


@pytest.mark.parametrize("decay", ["none", "gated"])
@pytest.mark.parametrize("feature_map", ["t2r", "elu", "performer"])
def test_module_decoding_and_blocks_equal_full_forward(decay, feature_map):
    attn = _attention(8, decay, feature_map=feature_map)
    x = _x(time=100)
    full = attn(x, x, x)[0].detach()
    with torch.no_grad():
        for prefix in (0, 1, 5, 30):
            torch.testing.assert_close(_decode(attn, x, prefix), full, rtol=1e-10, atol=1e-10)
        state = {}  # a long input read block by block (stream scoring, chunked prefill)
        blocks = torch.cat([attn(x[s:s + 7], None, None, incremental_state=state)[0] for s in range(0, 100, 7)])
        torch.testing.assert_close(blocks, full, rtol=1e-10, atol=1e-10)
    # Under autograd the step does not update in place; values are the same.
    torch.testing.assert_close(_decode(attn, x[:20], 3), full[:20], rtol=1e-10, atol=1e-10)


def test_module_reorder_equals_the_permuted_batch():
    order = torch.tensor([2, 0, 3, 3])  # beam search also duplicates rows
    continued, reference = decode_reordered(_attention(4, "gated"), _x(time=12, batch=4), order, 7)
    torch.testing.assert_close(continued, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", ["none", "gated"])
def test_padding_never_enters_the_ring_or_the_state(decay):
    """Left padding changes no real output; padding at a block's end (a stream's last block) and
    padded decode steps leave the state as the real tokens left it, and what follows reads the same."""
    attn = _attention(6, decay)
    x, junk = _x(time=20, batch=2), _x(time=6, batch=2, seed=9)
    with torch.no_grad():
        out = attn(x, x, x)[0]
        left = torch.cat([junk, x])
        pad_first = torch.zeros(2, 26, dtype=torch.bool)
        pad_first[1, :6] = True
        torch.testing.assert_close(attn(left, None, None, key_padding_mask=pad_first)[0][6:, 1], out[:, 1],
                                   rtol=1e-10, atol=1e-10)

        clean, padded = {}, {}
        attn(x[:12], None, None, incremental_state=clean)
        right = torch.cat([x[:12], junk])
        pad_last = torch.zeros(2, 18, dtype=torch.bool)
        pad_last[:, 12:] = True
        attn(right, None, None, key_padding_mask=pad_last, incremental_state=padded)
        for t in range(3):  # padded decode steps, then real ones
            attn(junk[t:t + 1], None, None, key_padding_mask=torch.ones(2, 1, dtype=torch.bool),
                 incremental_state=padded)
        _assert_same_keys(*(attn.form.load(attn._get_input_buffer(state)) for state in (padded, clean)), 6, tol=0)
        torch.testing.assert_close(_decode(attn, x[12:], 0, padded), out[12:], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", ["none", "gated"])
def test_ragged_prompts_then_decoding_equal_each_row_alone(decay):
    """A batch of prompts of different lengths (left-padded), read at once, then decoded past the window
    with one shared ring slot per step: each row continues as it does alone, without padding."""
    attn = _attention(6, decay)
    prompts, steps = _x(time=9, batch=2), _x(time=15, batch=2, seed=5)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, :7] = True  # row 1's prompt: 2 tokens
    with torch.no_grad():
        state = {}
        attn(prompts, None, None, key_padding_mask=pad, incremental_state=state)
        both = _decode(attn, steps, 0, state)
        for row, start in ((0, 0), (1, 7)):
            alone = {}
            attn(prompts[start:, row:row + 1], None, None, incremental_state=alone)
            torch.testing.assert_close(both[:, row:row + 1], _decode(attn, steps[:, row:row + 1], 0, alone),
                                       rtol=1e-10, atol=1e-10)


def test_no_window_has_no_tensors_and_calls_the_plain_math():
    """--t2r-window 0 is the model of before: the same tensors, the same state, the plain math."""
    attn = T2RSelfAttention(16, 2, feature_dim=4).double()
    assert not attn.window and set(attn.state_dict()) == set(T2RSelfAttention(16, 2, feature_dim=4).state_dict())
    x = _x(time=70)
    state = {}
    with torch.no_grad():
        p = attn._project(x, None, None)
        assert p.raw_q is None and p.raw_k is None and p.log_balance is None
        out, _ = la.packed_causal_linear_attention(p.q, p.k, p.v1, chunk_size=attn.chunk_size)
        assert torch.equal(attn(x, x, x, incremental_state=state)[0], attn._merge(out))
    assert list(attn._get_input_buffer(state)) == ["state"]


# -- whole decoders ----------------------------------------------------------------------------------
def _model(window, extra=()):
    model, _ = build_model("t2r_lm", TINY_LM + ["--t2r-window", window, *extra])
    with torch.no_grad():  # both parts count: a wrong balance, ring or state shows
        for name, p in model.named_parameters():
            if name.endswith("log_balance"):
                p.copy_(torch.tensor([-2.0, -1.0, 0.0, 1.0]))
    return model


DECODER_CASES = {
    "t2r": [],
    "elu": ["--t2r-feature-map", "elu"],
    "rfa": ["--t2r-feature-map", "rfa"],
    "hedgehog": ["--t2r-feature-map", "hedgehog"],
    "performer": ["--t2r-feature-map", "performer"],
    "hybrid": ["--t2r-softmax-layers", "1"],
    "gated_decay": ["--t2r-decay", "gated"],
}


@pytest.mark.parametrize("case", DECODER_CASES)
def test_decoder_decodes_token_by_token_as_its_full_forward(case):
    model = _model(8, DECODER_CASES[case])
    tokens = _tokens(3, 70, 60)  # past W and a chunk boundary (64)
    with torch.no_grad():
        full = _log_probs(model, tokens)
        steps, _ = _incremental(model, tokens)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_translation_decoder_with_a_window_decodes_as_its_full_forward():
    model = build_model("t2r_transformer", TINY_MT + ["--t2r-window", 5], task="translation")[0]
    d = model.decoder.dictionary
    src, lengths = _left_padded_sources([9, 5, 1, 7], d.pad(), d.eos())
    tgt = _targets(4, 20, d.eos())
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full = _log_probs(model, tgt, encoder_out=enc)
        steps, _ = _incremental(model, tgt, encoder_out=enc)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_prefill_then_decoding_equals_full_forward():
    model = _model(8, ["--t2r-decay", "learned"])
    tokens = _tokens(2, 40, 60)
    with torch.no_grad():
        full = _log_probs(model, tokens)
        state = {}
        prefilled = model.get_normalized_probs(prefill(model.decoder, tokens[:, :25], state), log_probs=True)
        rest, _ = _incremental(model, tokens, state=state, start=25)
    torch.testing.assert_close(torch.cat([prefilled, rest], dim=1), full, rtol=1e-4, atol=1e-4)


def test_decoder_state_grows_like_a_cache_to_the_window_then_stays():
    model = _model(8)
    tokens = _tokens(1, 30, 60)
    sizes = []
    with torch.no_grad():
        state = {}
        for t in range(tokens.size(1)):
            _log_probs(model, tokens[:, :t + 1], incremental_state=state)
            sizes.append(sum(v.numel() for key, buf in state.items() if key.endswith("t2r_state")
                             for v in buf.values() if torch.is_tensor(v)))
    slot = 4 * (8 + 9 + 8 + 1)  # heads x (k, v1, [phi(k) | age])
    assert sizes == [2 * (4 * 8 * 9 + min(t + 1, 8) * slot) for t in range(30)]  # layers x ([S | z] + ring)


def test_decoder_reorder_equals_decoding_the_permuted_batch():
    model = _model(5, ["--t2r-decay", "gated"])
    continued, reference = decoder_reordered(model, _tokens(4, 14, 60, seed=1), torch.tensor([2, 0, 3, 3]), 8)
    torch.testing.assert_close(continued, reference, rtol=1e-4, atol=1e-4)


# -- options and conversion --------------------------------------------------------------------------
def test_conversion_names_the_balances_as_new():
    from t2r_fairseq.transfer import transfer_softmax_weights

    softmax, _ = build_model("transformer_lm", TINY_LM_SOFTMAX)
    student = _model(8, ["--t2r-decay", "learned"])
    new = set(transfer_softmax_weights(student, softmax.state_dict()))
    assert new == {k for k in student.state_dict() if k.endswith(".log_balance") or ".feature_map." in k
                   or ".decay." in k}
    assert {"decoder.layers.0.self_attn.log_balance", "decoder.layers.1.self_attn.log_balance"} <= new


@pytest.mark.parametrize("extra,expect", [
    (["--t2r-window", "-1"], "--t2r-window must be an integer between 0 (off) and the model's 512 positions"),
    (["--t2r-window", "513"], "--t2r-window must be an integer between 0 (off) and the model's 512 positions"),
    (["--t2r-window", "4", "--t2r-softmax-layers", "0,1"], "--t2r-window 4 is a window of T2R self-attention"),
])
def test_bad_windows_are_one_clear_error(extra, expect):
    from t2r_fairseq.options import T2ROptionError

    with pytest.raises(T2ROptionError, match=re.escape(expect)):
        build_model("t2r_lm", TINY_LM + ["--tokens-per-sample", 512, *extra])


def test_converter_with_a_window_as_typed(tmp_path):
    """t2r-convert --t2r-window 8: the log names the balances as new; out of range is one line, nothing written."""
    softmax, cfg = build_model("transformer_lm", TINY_LM_SOFTMAX)
    teacher = save_checkpoint(tmp_path / "softmax.pt", softmax, cfg)
    proc = run(["t2r-convert", "--input", teacher, "--output", tmp_path / "t2r.pt", "--t2r-window", 8])
    assert {"decoder.layers.0.self_attn.log_balance", "decoder.layers.1.self_attn.log_balance"} <= \
        converter_log(proc.stdout + proc.stderr)
    assert torch.load(tmp_path / "t2r.pt", weights_only=False)["cfg"]["model"]["t2r_window"] == 8
    bad = run(["t2r-convert", "--input", teacher, "--output", tmp_path / "bad.pt", "--t2r-window", -3], check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("t2r-convert: error: --t2r-window must be an integer")
    assert not (tmp_path / "bad.pt").exists()


def test_attention_transfer_with_a_window_as_typed(lm_workdir):
    """fairseq-train --convert-from ... --t2r-window 8 with the attention-transfer criterion: the log
    names the balances as new, and the transfer-only updates train them (and nothing of the teacher)."""
    save = lm_workdir / "t2r_window"
    proc = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
                "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL,
                *[a for a in TRAIN if a not in ("--criterion", "adaptive_loss")], "--criterion",
                "t2r_attention_transfer", "--attention-transfer-only-updates", 2, "--max-update", 2,
                "--save-dir", save, "--t2r-window", 8])
    _, new = conversion_log(proc.stdout + proc.stderr)
    assert "decoder.layers.1.self_attn.log_balance" in new
    student = torch.load(save / "checkpoint_last.pt", weights_only=False)["model"]
    teacher = torch.load(lm_workdir / "softmax/checkpoint_last.pt", weights_only=False)["model"]
    for name, value in teacher.items():
        torch.testing.assert_close(student[name], value, rtol=0, atol=0)
    start = T2RSelfAttention(32, 4, window=8).log_balance
    assert not torch.equal(student["decoder.layers.1.self_attn.log_balance"].float(), start)
