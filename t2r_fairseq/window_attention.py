"""Sliding-window softmax + linear attention in one normalisation (LoLCATs-style): the math, pure
torch (no fairseq import).

Query i weighs key j <= i with

    exp(q_i.k_j / sqrt(d))                             if i - W < j    (the window: exact softmax scores)
    beta * exp(c_i - c_j) phi(q_i).phi(k_j)            otherwise       (older keys: linear scores)

and out_i = sum_j w_ij v_j / sum_j w_ij: one numerator and one denominator over both parts. q, k are
the raw projected queries and keys, phi(q), phi(k) their features; beta = exp(log_balance) > 0 is a
per-head balance; c_t is the cumulative log-gate sum of linear_attention.py's decay (c = 0 without
log_g), applied to the linear part only. With W >= length this is exact causal softmax attention.

Shapes: q, k: (batch, heads, time, head_dim); phi_q, phi_k: (batch, heads, time, features);
v1 = [v | 1]: (batch, heads, time, dim + 1) (linear_attention.with_ones_column); log_g as in
linear_attention.py; padding: (batch, time) bool, True at padded positions, whose keys enter no
window, ring or state; log_balance: (heads,).

Every form returns (out: (batch, heads, time, dim) in v1's dtype, WindowState), so a prefix can run
in parallel and continue step by step. The state is constant in size whatever the prefix: the packed
linear state [S | z] of every key older than the window (linear_attention.py's), a ring buffer of the
last W keys, and per row the number of keys seen. A key leaves the ring exactly when it enters [S | z].

Numerics: with m_i the window's largest score, numerator and denominator are both divided by
exp(M_i), M_i = max(m_i, log(beta |phi(q_i).z_i|)) (z_i: the linear normalizer), exp(M_i) itself never
formed: every softmax exponent is <= 0, the linear part is scaled to at most the denominator, which is
>= 1, and nothing overflows however long the input or large the scores. Decay stays in log space, as
in linear_attention.py; the state and ring are kept in at least float32.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .linear_attention import DEFAULT_CHUNK_SIZE, _decayed_chunk_states, accumulation_dtype

# The shift is never below log(beta) - 60: exp(log(beta) - M) <= e^60 then stays finite in float32
# even where both parts are vanishingly small (their ratio, the output, does not depend on M).
_MAX_LINEAR_SCALE_EXPONENT = 60.0


class WindowState(NamedTuple):
    """packed: [S | z] of the keys older than the window, (batch, heads, features, dim + 1);
    ring: the last W keys, (batch, heads, W, head_dim + features + dim + 1 + 1), each row
    [k | phi(k) | v1 | age], age = the log-decay accumulated since the key was read (0 without decay),
    key number n (counted from 0 over the non-padded keys of a row) in slot n mod W;
    count: (batch,) int64, how many non-padded keys each row has read.
    All batch-first: beam search reorders each with one index_select(0)."""
    packed: Tensor
    ring: Tensor
    count: Tensor


def empty_window_state(q: Tensor, phi_q: Tensor, v1: Tensor, window: int) -> WindowState:
    batch, heads, _, head_dim = q.shape
    feat, width = phi_q.size(-1), v1.size(-1)
    acc = accumulation_dtype(q)
    return WindowState(q.new_zeros(batch, heads, feat, width, dtype=acc),
                       q.new_zeros(batch, heads, window, head_dim + feat + width + 1, dtype=acc),
                       torch.zeros(batch, dtype=torch.long, device=q.device))


def _ring_entries(k: Tensor, phi_k: Tensor, v1: Tensor, acc: torch.dtype) -> Tensor:
    """Rows of the ring layout for new keys (age 0): (b, h, t, head_dim + features + width + 1)."""
    return torch.cat([k.to(acc), phi_k.to(acc), v1.to(acc), k.new_zeros(*k.shape[:-1], 1, dtype=acc)], dim=-1)


def _split_ring(rows: Tensor, head_dim: int, feat: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """ring rows -> (k, phi(k), v1, age: (..., slots))"""
    k, phi, rest = rows.split([head_dim, feat, rows.size(-1) - head_dim - feat], dim=-1)
    return k, phi, rest[..., :-1], rest[..., -1]


def _ring_in_time_order(state: WindowState) -> Tuple[Tensor, Tensor]:
    """The ring's rows oldest first, (b, h, W, columns), and which are keys, (b, W): with n keys
    read, the oldest is in slot n mod W; fewer than W read leaves the first W - n rows empty."""
    batch, heads, window, cols = state.ring.shape
    steps = torch.arange(window, device=state.count.device)
    slots = (state.count[:, None] + steps) % window
    rows = state.ring.gather(2, slots[:, None, :, None].expand(batch, heads, window, cols))
    return rows, steps >= window - state.count.clamp(max=window)[:, None]


def _combine(scores: Tensor, values: Tensor, linear: Tensor, log_balance: Tensor) -> Tensor:
    """One normalisation over both parts. scores: (..., queries, keys) q.k / sqrt(d), -inf outside
    the window; values: (..., keys, dim + 1) = v1 of those keys; linear: (..., queries, dim + 1), the
    unweighted linear [numerator | denominator] of the older keys; log_balance broadcasting to
    (..., queries). Returns (..., queries, dim)."""
    linear = torch.cat([linear[..., :-1], linear[..., -1:].abs()], dim=-1)  # |den|: sign-indefinite maps
    shift = torch.maximum(scores.amax(-1), log_balance + linear[..., -1].log())
    # The output does not depend on the shift: no gradient through it.
    shift = torch.maximum(shift, log_balance - _MAX_LINEAR_SCALE_EXPONENT).detach()
    both = (scores - shift.unsqueeze(-1)).exp() @ values + (log_balance - shift).exp().unsqueeze(-1) * linear
    return both[..., :-1] / both[..., -1:].clamp_min(torch.finfo(both.dtype).tiny)


def _log_gates(log_g: Optional[Tensor], batch: int, heads: int, time: int, valid: Tensor, acc) -> Tensor:
    """(b, h, t) log-gates in acc, 0 (gate 1) at padding and without decay."""
    if log_g is None:
        return valid.new_zeros(batch, heads, time, dtype=acc)
    return log_g.to(acc).expand(batch, heads, time) * valid[:, None, :]


def _valid(padding: Optional[Tensor], batch: int, time: int, device) -> Tensor:
    if padding is None:
        return torch.ones(batch, time, dtype=torch.bool, device=device)
    return ~padding.bool()


def _head_column(log_balance: Tensor, acc) -> Tensor:
    return log_balance.to(acc).view(1, -1, 1)


def packed_window_attention(q: Tensor, k: Tensor, v1: Tensor, phi_q: Tensor, phi_k: Tensor, *, window: int,
                            log_balance: Tensor, initial_state: Optional[WindowState] = None,
                            log_g: Optional[Tensor] = None, padding: Optional[Tensor] = None,
                            chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tuple[Tensor, WindowState]:
    """Chunked form: memory linear in length, never a T x T matrix. Chunks are C = max(chunk_size,
    W) long (shorter for short inputs), so a query's window lies in its own chunk and the one before:
    chunk n reads (C x 2C) softmax scores over chunks n-1 and n, linear scores over the older keys
    among them, and the linear state before chunk n-1. The initial state's ring, oldest key first, is chunk -1 (its keys' ages
    already applied to phi(k), its log-gates 0), and its [S | z] the state before it.

    The final state holds the last W non-padded keys in the ring and every earlier one in [S | z]:
    padding at the end of a block (a stream's last block) leaves the state of the real keys."""
    batch, heads, time, head_dim = q.shape
    feat, width = phi_q.size(-1), v1.size(-1)
    state = empty_window_state(q, phi_q, v1, window) if initial_state is None else initial_state
    if time == 0:
        return v1.new_zeros(batch, heads, 0, width - 1), state
    acc = state.packed.dtype
    valid_new = _valid(padding, batch, time, q.device)
    a_new = _log_gates(log_g, batch, heads, time, valid_new, acc)
    new_rows = _ring_entries(k, phi_k * valid_new[:, None, :, None], v1, acc)
    ring_rows, ring_valid = _ring_in_time_order(state)
    ring_rows = ring_rows * ring_valid[:, None, :, None]

    # [left pad | ring | new | right pad]: chunk -1 is the left pad and the ring.
    chunk = max(min(chunk_size, time), window)
    n_chunks = -(-time // chunk)
    lead, tail = chunk - window, n_chunks * chunk - time
    rows = torch.nn.functional.pad(torch.cat([ring_rows, new_rows], dim=2), (0, 0, lead, tail))
    valid = torch.nn.functional.pad(torch.cat([ring_valid, valid_new], dim=1), (lead, tail), value=False)
    a = torch.nn.functional.pad(a_new, (chunk, tail))
    keys, phi, values, age = _split_ring(rows, head_dim, feat)
    phi = phi * age.exp().unsqueeze(-1)  # a ring key has decayed by its age already

    def chunked(x: Tensor) -> Tensor:  # (b, h, L, .) -> (b, h, n + 1, C, .)
        return x.view(batch, heads, n_chunks + 1, chunk, *x.shape[3:])

    def local(x: Tensor) -> Tensor:  # chunks n-1 and n side by side: (b, h, n, 2C, .)
        return torch.cat([x[:, :, :-1], x[:, :, 1:]], dim=3)

    # Keys that chunk n reads linearly: those of chunks n-1 and n at least W before the query; with
    # W = C (the usual case: C = max(chunk_size, W)) none of chunk n, so chunk n-1 alone.
    span = chunk if window == chunk else 2 * chunk

    def older(x: Tensor) -> Tensor:  # (b, h, n, span, .)
        return x[:, :, :-1] if span == chunk else local(x)

    kc, phic, vc = chunked(keys), chunked(phi), chunked(values)
    valid_c = valid.view(batch, 1, n_chunks + 1, chunk)
    qc = torch.nn.functional.pad(q.to(acc), (0, 0, 0, tail)).view(batch, heads, n_chunks, chunk, head_dim)
    phi_qc = torch.nn.functional.pad(phi_q.to(acc), (0, 0, 0, tail)).view(batch, heads, n_chunks, chunk, feat)
    distance = (torch.arange(chunk, 2 * chunk, device=q.device)[:, None]
                - torch.arange(2 * chunk, device=q.device)[None, :])  # (C, 2C): query i - key j
    in_window = (distance >= 0) & (distance < window) & local(valid_c)[..., None, :]
    scores = (qc @ local(kc).transpose(-1, -2)) * head_dim ** -0.5
    scores = scores.masked_fill(~in_window, -torch.inf)

    linear_scores = phi_qc @ older(phic).transpose(-1, -2)
    if log_g is None:
        linear_scores = linear_scores.masked_fill(distance[:, :span] < window, 0.0)
        kept = phic  # each key as it is at its chunk's end
        chunk_log_decay = None
    else:
        c = chunked(a).cumsum(-1)  # (b, h, n + 1, C), inside each chunk
        totals = c[..., -1]
        c_local = torch.cat([c[:, :, :-1], c[:, :, :-1, -1:] + c[:, :, 1:]], dim=-1)  # (b, h, n, 2C)
        c_query = c_local[..., chunk:]
        decay = (c_query.unsqueeze(-1) - c_local[..., :span].unsqueeze(-2))
        decay = decay.masked_fill(distance[:, :span] < window, -torch.inf).exp()
        linear_scores = linear_scores * decay
        kept = phic * (totals.unsqueeze(-1) - c).exp().unsqueeze(-1)
        phi_qc = phi_qc * c_query.exp().unsqueeze(-1)  # what reads the state before chunk n-1
        chunk_log_decay = totals
    chunk_kv = kept.transpose(-1, -2) @ vc
    before = _states_before(chunk_kv[:, :, :-1], state.packed,
                            None if chunk_log_decay is None else chunk_log_decay[:, :, :-1])
    linear = linear_scores @ older(vc) + phi_qc @ before

    log_balance = _head_column(log_balance, acc).unsqueeze(-1)  # (1, h, 1, 1): over chunks and queries
    out = _combine(scores, local(vc), linear, log_balance)
    out = out.reshape(batch, heads, n_chunks * chunk, width - 1)[:, :, :time].to(v1.dtype)

    # Final state: the keys that stay in the ring are the last W non-padded ones; all before enter [S | z].
    left_behind = valid.sum(-1, keepdim=True) - valid.cumsum(-1)  # non-padded keys after each position
    entered = (valid & (left_behind >= window)).view(batch, 1, n_chunks + 1, chunk, 1)
    packed = _final_state((kept * entered).transpose(-1, -2) @ vc, state.packed, chunk_log_decay)
    count = state.count + valid_new.sum(-1)
    return out, WindowState(packed, _final_ring(rows, valid, a, count, window), count)


def _states_before(chunk_kv: Tensor, initial: Tensor, chunk_log_decay: Optional[Tensor]) -> Tensor:
    """The state before each chunk: (b, h, n, feat, width)."""
    if chunk_log_decay is None:
        inclusive = chunk_kv.cumsum(dim=2) + initial.unsqueeze(2)
        return torch.cat([initial.unsqueeze(2), inclusive[:, :, :-1]], dim=2)
    return _decayed_chunk_states(chunk_kv, initial, chunk_log_decay)[0]


def _final_state(chunk_kv: Tensor, initial: Tensor, chunk_log_decay: Optional[Tensor]) -> Tensor:
    if chunk_log_decay is None:
        return initial + chunk_kv.sum(dim=2)
    return _decayed_chunk_states(chunk_kv, initial, chunk_log_decay)[1].clone(memory_format=torch.contiguous_format)


def _final_ring(rows: Tensor, valid: Tensor, a: Tensor, count: Tensor, window: int) -> Tensor:
    """The ring after reading `rows` (b, h, L, columns; `valid` (b, L)): the t-th last non-padded
    key (t < W), key number count - 1 - t, goes to slot (count - 1 - t) mod W, its age increased by
    the log-gates after it."""
    batch, heads, length, cols = rows.shape
    # log-decay after each position: a reversed cumulative sum, exact for the recent positions kept.
    after = torch.nn.functional.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
    rows = torch.cat([rows[..., :-1], (rows[..., -1] + after).unsqueeze(-1)], dim=-1)
    seen = valid.long().cumsum(-1)  # non-decreasing: searchsorted finds the position of each key
    slots = torch.arange(window, device=rows.device)
    t = (count[:, None] - 1 - slots) % window  # (b, W)
    wanted = seen[:, -1:] - t
    position = torch.searchsorted(seen, wanted.clamp_min(1)).clamp(max=length - 1)
    ring = rows.gather(2, position[:, None, :, None].expand(batch, heads, window, cols))
    return ring * (wanted >= 1)[:, None, :, None]


def packed_window_attention_step(q: Tensor, k: Tensor, v1: Tensor, phi_q: Tensor, phi_k: Tensor,
                                 state: Optional[WindowState] = None, *, window: int, log_balance: Tensor,
                                 log_g: Optional[Tensor] = None, padding: Optional[Tensor] = None,
                                 inplace: bool = False) -> Tuple[Tensor, WindowState]:
    """One new position (time == 1): the key in ring slot count mod W (the oldest, if the ring is
    full) enters [S | z] and the new key takes its slot; the query reads the ring (softmax) and
    [S | z] (linear). Constant cost whatever the prefix. A padded row changes nothing.

    With ``inplace=True`` the given state's tensors are updated in place (no allocation for the
    state per decode step); callers that keep the old state for autograd or reuse leave it False."""
    batch, heads, _, head_dim = q.shape
    feat = phi_q.size(-1)
    state = empty_window_state(q, phi_q, v1, window) if state is None else state
    acc = state.packed.dtype
    # Decoding has no padding and, without decay, every age is 0: those steps skip what would
    # multiply by one (a decode step is dozens of small ops, each of which costs).
    valid = None if padding is None else _valid(padding, batch, 1, q.device)  # (b, 1)
    a = None if log_g is None else _log_gates(
        log_g, batch, heads, 1, _valid(None, batch, 1, q.device) if valid is None else valid, acc)
    slot = (state.count % window).view(batch, 1, 1, 1).expand(batch, heads, 1, state.ring.size(-1))
    leaving = state.ring.gather(2, slot)  # (b, h, 1, columns), a copy
    _, leaving_phi, leaving_v1, leaving_age = _split_ring(leaving, head_dim, feat)
    # The leaving key has aged by this step's gate too; an empty slot holds zeros and adds nothing.
    if a is not None:
        leaving_phi = leaving_phi * (leaving_age + a).exp().unsqueeze(-1)
    if valid is not None:
        leaving_phi = leaving_phi * valid[:, None, :, None]
    leaving_kv = leaving_phi.transpose(-1, -2)  # (b, h, feat, 1)
    entry = _ring_entries(k, phi_k, v1, acc)
    if valid is not None:
        entry = torch.where(valid[:, None, :, None], entry, leaving)
    added = 1 if valid is None else valid[:, 0].long()
    packed, ring, count = state
    if inplace:
        if a is not None:
            packed.mul_(a.exp().unsqueeze(-1))
            ring[..., -1].add_(a)
        packed.addcmul_(leaving_kv, leaving_v1)
        ring.scatter_(2, slot, entry)
        count.add_(added)
    else:
        if a is not None:
            packed = packed * a.exp().unsqueeze(-1)
            ring = torch.cat([ring[..., :-1], (ring[..., -1] + a).unsqueeze(-1)], dim=-1)
        packed = torch.addcmul(packed, leaving_kv, leaving_v1)
        ring = ring.scatter(2, slot, entry)
        count = count + added
    keys, _, values, _ = _split_ring(ring, head_dim, feat)
    scores = (q.to(acc) * head_dim ** -0.5) @ keys.transpose(-1, -2)  # (b, h, 1, W)
    empty = torch.arange(window, device=q.device) >= count[:, None]  # (b, W): slots not yet written
    scores = scores.masked_fill(empty[:, None, None, :], -torch.inf)
    out = _combine(scores, values, phi_q.to(acc) @ packed, _head_column(log_balance, acc))
    return out.to(v1.dtype), WindowState(packed, ring, count)


def recurrent_window_attention(q: Tensor, k: Tensor, v1: Tensor, phi_q: Tensor, phi_k: Tensor, *, window: int,
                               log_balance: Tensor, initial_state: Optional[WindowState] = None,
                               log_g: Optional[Tensor] = None, padding: Optional[Tensor] = None
                               ) -> Tuple[Tensor, WindowState]:
    """Step by step over a whole sequence (reference for tests; what decoding computes)."""
    state = initial_state
    time = q.size(2)
    if log_g is not None:
        log_g = log_g.expand(q.size(0), q.size(1), time)
    outs = []
    for t in range(time):
        step = slice(t, t + 1)
        out, state = packed_window_attention_step(
            q[:, :, step], k[:, :, step], v1[:, :, step], phi_q[:, :, step], phi_k[:, :, step], state,
            window=window, log_balance=log_balance, log_g=None if log_g is None else log_g[:, :, step],
            padding=None if padding is None else padding[:, step])
        outs.append(out)
    if state is None:
        state = empty_window_state(q, phi_q, v1, window)
    return (torch.cat(outs, dim=2) if outs else v1.new_zeros(*v1.shape[:-1], v1.size(-1) - 1)), state


def naive_window_attention(q: Tensor, k: Tensor, v1: Tensor, phi_q: Tensor, phi_k: Tensor, *, window: int,
                           log_balance: Tensor, initial_state: Optional[WindowState] = None,
                           log_g: Optional[Tensor] = None, padding: Optional[Tensor] = None
                           ) -> Tuple[Tensor, WindowState]:
    """Quadratic reference, the definition written out (unshifted exp; tests only, float64): the
    initial ring's keys, oldest first, precede the new ones; the initial [S | z] is read with
    exp(c_i). The final ring is filled key by key."""
    batch, heads, time, head_dim = q.shape
    feat = phi_q.size(-1)
    state = empty_window_state(q, phi_q, v1, window) if initial_state is None else initial_state
    acc = state.packed.dtype
    valid_new = _valid(padding, batch, time, q.device)
    ring_rows, ring_valid = _ring_in_time_order(state)
    rows = torch.cat([ring_rows * ring_valid[:, None, :, None],
                      _ring_entries(k, phi_k * valid_new[:, None, :, None], v1, acc)], dim=2)
    valid = torch.cat([ring_valid, valid_new], dim=1)
    a = torch.nn.functional.pad(_log_gates(log_g, batch, heads, time, valid_new, acc), (window, 0))
    keys, phi, values, age = _split_ring(rows, head_dim, feat)
    # c_i - c_j is the log-decay from key j to query i; a ring key has decayed by its age already.
    c = a.cumsum(-1) - torch.nn.functional.pad(age[..., :window], (0, time))
    c_query = c[..., window:]
    distance = torch.arange(window, window + time)[:, None] - torch.arange(window + time)[None, :]
    beta = _head_column(log_balance, acc).exp().unsqueeze(-1)
    in_window = ((distance >= 0) & (distance < window))[None, None] & valid[:, None, None, :]
    softmax = ((q.to(acc) @ keys.transpose(-1, -2)) * head_dim ** -0.5).masked_fill(~in_window, -torch.inf).exp()
    older = (distance >= window)[None, None]
    decay = (c_query.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~older, -torch.inf).exp()
    linear = beta * (phi_q.to(acc) @ phi.transpose(-1, -2)) * decay
    from_state = beta * (phi_q.to(acc) * c_query.exp().unsqueeze(-1)) @ state.packed
    numerator = (softmax + linear) @ values[..., :-1] + from_state[..., :-1]
    denominator = softmax.sum(-1) + (linear.sum(-1) + from_state[..., -1]).abs()
    out = numerator / denominator.clamp_min(torch.finfo(acc).tiny).unsqueeze(-1)  # no key at all: 0

    total = a.sum(-1, keepdim=True)
    left_behind = valid.sum(-1, keepdim=True) - valid.cumsum(-1)
    entered = (valid & (left_behind >= window))[:, None, :, None]
    weights = (total - c).exp().unsqueeze(-1)
    packed = total.exp().unsqueeze(-1) * state.packed + (phi * entered * weights).transpose(-1, -2) @ values
    ring = torch.zeros_like(state.ring)
    number = state.count - ring_valid.sum(-1)  # key number of the first key here
    rows = torch.cat([rows[..., :-1], (total - c).unsqueeze(-1)], dim=-1)
    for j in range(window + time):
        for row in range(batch):
            if valid[row, j]:
                ring[row, :, int(number[row]) % window] = rows[row, :, j]
                number[row] += 1
    return out.to(v1.dtype), WindowState(packed, ring, number)
