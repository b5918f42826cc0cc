"""Sliding-window softmax + linear attention in one normalisation (LoLCATs-style): the math, pure
torch (no fairseq import).

Query i weighs key j <= i with

    exp(q_i.k_j / sqrt(d))                             if i - W < j    (the window: exact softmax scores)
    beta * exp(c_i - c_j) phi(q_i).phi(k_j)            otherwise       (older keys: linear scores)

and out_i = sum_j w_ij v_j / sum_j w_ij: one numerator and one denominator over both parts. phi(q),
phi(k) are the features of the raw projected queries and keys q, k; beta = exp(log_balance) > 0 is a
per-head balance; c_t is the cumulative log-gate sum of linear_attention.py's decay (c = 0 without
log_g), applied to the linear part only. With W >= length this is exact causal softmax attention.

Every form takes linear_attention.py's leading arguments, phi(q), phi(k), v1, then the raw q and k:
phi_q, phi_k: (batch, heads, time, features); v1 = [v | 1]: (batch, heads, time, dim + 1)
(linear_attention.with_ones_column); q, k: (batch, heads, time, head_dim); log_g as in
linear_attention.py; padding: (batch, time) bool, True at padded positions, whose keys enter no
window, ring or state; log_balance: (heads,).

Every form returns (out: (batch, heads, time, dim) in v1's dtype, WindowState), so a prefix can run
in parallel and continue step by step. The state is the packed linear state [S | z] of every key
older than the window (linear_attention.py's) and a ring of the last W positions kept like a
key/value cache: position p in slot p mod W, one position counter for every row, growing until it
holds W slots. A key leaves the ring exactly when it enters [S | z], its phi(k) stored so that it
enters without being mapped again.

Numerics: the linear part enters the softmax over the window's scores as one more entry, its score
log(beta |phi(q_i).z_i|) (z_i: the linear normalizer, taken at least e^-60) and its value the linear
output; the softmax divides numerator and denominator by exp of the largest entry, never formed:
every exponent is <= 0, and nothing overflows however long the input or large the scores. Decay
stays in log space, as in linear_attention.py; the state and ring are kept in at least float32.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .linear_attention import DEFAULT_CHUNK_SIZE, accumulation_dtype, chunk_states

_MIN_LINEAR_DENOMINATOR = math.exp(-60.0)  # see _combine


class WindowState(NamedTuple):
    """packed: [S | z] of the keys older than the window, (batch, heads, features, dim + 1);
    the ring, slots = min(position, W), position p in slot p mod W, as three tensors:
    keys: k / sqrt(head_dim), (batch, heads, slots, head_dim); values: v1, (batch, heads, slots, dim + 1);
    features: [phi(k) | age], (batch, heads, slots, features + 1), age = the log-decay accumulated
    since the key was read (0 without decay). Three contiguous tensors, not one: the two products a
    step makes with the keys and the values run at half the speed on views into a wider buffer (torch's
    batched matmul on CPU then copies them);
    position: how many positions every row has read (decoding advances all rows together);
    valid: (batch, slots) bool, which slots hold one of the row's keys, None when all do. Only
    padding empties a slot: a row keeps its last W keys in the slots of the last positions, and the
    slots before them are empty (zero but for the age, never read).
    Tensors batch-first: beam search reorders each with one index_select(0)."""
    packed: Tensor
    keys: Tensor
    values: Tensor
    features: Tensor
    position: int
    valid: Optional[Tensor] = None


def empty_window_state(phi_q: Tensor, v1: Tensor, q: Tensor) -> WindowState:
    batch, heads, _, head_dim = q.shape
    acc = accumulation_dtype(q)
    feat, width = phi_q.size(-1), v1.size(-1)
    return WindowState(q.new_zeros(batch, heads, feat, width, dtype=acc),
                       *(q.new_zeros(batch, heads, 0, cols, dtype=acc) for cols in (head_dim, width, feat + 1)), 0)


def _ring_entries(phi_k: Tensor, v1: Tensor, k: Tensor, acc: torch.dtype) -> Tensor:
    """Ring rows [k / sqrt(head_dim) | phi(k) | v1 | age] for new keys (age 0): (b, h, t, head_dim +
    features + width + 1), the layout the parallel forms work on."""
    return torch.cat([k.to(acc) * k.size(-1) ** -0.5, phi_k.to(acc), v1.to(acc),
                      k.new_zeros(*k.shape[:-1], 1, dtype=acc)], dim=-1)


def _split_ring(rows: Tensor, head_dim: int, feat: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """ring rows -> (k / sqrt(head_dim), phi(k), v1, age: (..., slots))"""
    return rows[..., :head_dim], rows[..., head_dim:head_dim + feat], rows[..., head_dim + feat:-1], rows[..., -1]


def _ring_in_time_order(state: WindowState, window: int) -> Tuple[Tensor, Tensor]:
    """The ring as rows of the W positions before state.position, oldest first, (b, h, W, columns),
    and which hold keys, (b, W); positions before the first are empty."""
    batch, heads, slots, _ = state.keys.shape
    valid = state.keys.new_ones(batch, slots, dtype=torch.bool) if state.valid is None else state.valid
    rows = torch.cat([state.keys, state.features[..., :-1], state.values, state.features[..., -1:]], dim=-1)
    if slots == window:  # the oldest position is in slot position mod W
        rows, valid = rows.roll(-(state.position % window), 2), valid.roll(-(state.position % window), 1)
    return (torch.nn.functional.pad(rows, (0, 0, window - slots, 0)),
            torch.nn.functional.pad(valid, (window - slots, 0), value=False))


def _ring_in_slots(rows: Tensor, valid: Optional[Tensor], position: int, window: int, head_dim: int, feat: int
                   ) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The inverse: rows of the W positions before `position` in time order -> the ring's slots,
    (keys, values, features, valid) (valid: None if every slot kept holds a key)."""
    slots = min(position, window)
    rows, valid = rows[:, :, window - slots:], None if valid is None else valid[:, window - slots:]
    if valid is not None and bool(valid.all()):
        valid = None
    if slots == window:
        rows = rows.roll(position % window, 2)
        valid = None if valid is None else valid.roll(position % window, 1)
    keys, phi, values, age = _split_ring(rows, head_dim, feat)
    return keys.contiguous(), values.contiguous(), torch.cat([phi, age.unsqueeze(-1)], dim=-1), valid


def _combine(scores: Tensor, values: Tensor, linear: Tensor, log_balance: Tensor) -> Tensor:
    """One normalisation over both parts, the linear part as one more softmax entry: its score
    log(beta |den|) and its value num / |den|, where [num | den] = `linear`, the unweighted linear
    numerator and denominator of the older keys. scores: (..., queries, keys) q.k / sqrt(d), -inf
    outside the window; values: (..., keys, dim + 1) = v1 of those keys; linear: (..., queries,
    dim + 1); log_balance broadcasting to (..., queries, 1). Returns (..., queries, dim).

    |den| (sign-indefinite maps) is taken at least e^-60: beta e^-60 then stays the linear entry's
    weight where relu features are all zero (its value is then 0), and no score can overflow."""
    linear_den = linear[..., -1:].abs().clamp_min(_MIN_LINEAR_DENOMINATOR)
    weights = torch.cat([scores, linear_den.log() + log_balance], dim=-1).softmax(-1)
    window = weights[..., :-1] @ values
    return torch.addcmul(window[..., :-1], weights[..., -1:], linear[..., :-1] / linear_den)


def _log_gates(log_g: Optional[Tensor], batch: int, heads: int, time: int, valid: Tensor, acc) -> Tensor:
    """(b, h, t) log-gates in acc, 0 (gate 1) at padding and without decay."""
    if log_g is None:
        return valid.new_zeros(batch, heads, time, dtype=acc)
    return log_g.to(acc).expand(batch, heads, time) * valid[:, None, :]


def _valid(padding: Optional[Tensor], batch: int, time: int, device) -> Tensor:
    if padding is None:
        return torch.ones(batch, time, dtype=torch.bool, device=device)
    return ~padding.bool()


def _head_column(log_balance: Tensor, acc, dims: int) -> Tensor:
    """log_balance: (heads,) -> (1, heads, 1, ...) of `dims` dimensions."""
    return log_balance.to(acc).view(1, -1, *[1] * (dims - 2))


def window_attention(phi_q: Tensor, phi_k: Tensor, v1: Tensor, q: Tensor, k: Tensor, *, window: int,
                     log_balance: Tensor, initial_state: Optional[WindowState] = None, log_g: Optional[Tensor] = None,
                     padding: Optional[Tensor] = None, chunk_size: int = DEFAULT_CHUNK_SIZE
                     ) -> Tuple[Tensor, WindowState]:
    """Chunked form: memory linear in length, never a T x T matrix. Chunks are C = max(chunk_size,
    W) long (shorter for short inputs), so a query's window lies in its own chunk and the one before:
    chunk n reads (C x 2C) softmax scores over chunks n-1 and n, linear scores over the older keys
    among them, and the linear state before chunk n-1. The initial state's ring, in time order, is
    chunk -1 (its keys' ages already applied to phi(k), its log-gates 0), and its [S | z] the state
    before it.

    The final state holds each row's last W non-padded keys in the ring and every earlier one in
    [S | z]: padding at the end of a block (a stream's last block) leaves the state of the real keys."""
    batch, heads, time, head_dim = q.shape
    feat, width = phi_q.size(-1), v1.size(-1)
    state = empty_window_state(phi_q, v1, q) if initial_state is None else initial_state
    if time == 0:
        return v1.new_zeros(batch, heads, 0, width - 1), state
    acc = state.packed.dtype
    valid_new = _valid(padding, batch, time, q.device)
    a_new = _log_gates(log_g, batch, heads, time, valid_new, acc)
    new_rows = _ring_entries(phi_k * valid_new[:, None, :, None], v1, k, acc)
    ring_rows, ring_valid = _ring_in_time_order(state, window)

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
    scores = (qc @ local(kc).transpose(-1, -2)).masked_fill(~in_window, -torch.inf)  # keys are scaled in the ring

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
    before, _ = chunk_states(chunk_kv[:, :, :-1], state.packed,
                             None if chunk_log_decay is None else chunk_log_decay[:, :, :-1])
    linear = linear_scores @ older(vc) + phi_qc @ before

    out = _combine(scores, local(vc), linear, _head_column(log_balance, acc, 5))
    out = out.reshape(batch, heads, n_chunks * chunk, width - 1)[:, :, :time].to(v1.dtype)

    # Final state: the keys that stay in the ring are the last W non-padded ones; all before enter [S | z].
    left_behind = valid.sum(-1, keepdim=True) - valid.cumsum(-1)  # non-padded keys after each position
    entered = (valid & (left_behind >= window)).view(batch, 1, n_chunks + 1, chunk, 1)
    _, packed = chunk_states((kept * entered).transpose(-1, -2) @ vc, state.packed, chunk_log_decay)
    packed = packed.clone(memory_format=torch.contiguous_format)  # not a view holding every chunk's state
    position = state.position + time
    ring = _final_ring(rows, valid, None if log_g is None else a, chunk + time, position, window, head_dim, feat,
                       compact=padding is not None or state.valid is not None)
    return out, WindowState(packed, *ring[:3], position, ring[3])


def _final_ring(rows: Tensor, valid: Tensor, a: Optional[Tensor], end: int, position: int, window: int,
                head_dim: int, feat: int, compact: bool) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The ring after reading `rows` (b, h, L, columns; `valid` (b, L); the last position read at
    end - 1): each row's last W non-padded keys, in the slots of the last W positions, their ages
    increased by the log-gates `a` after them. Without padding (compact False) those are simply the
    last W rows."""
    batch, heads, length, cols = rows.shape
    if a is not None:
        # log-decay after each position: a reversed cumulative sum, exact for the recent positions kept.
        after = torch.nn.functional.pad(a.flip(-1).cumsum(-1).flip(-1)[..., 1:], (0, 1))
        rows = torch.cat([rows[..., :-1], (rows[..., -1] + after).unsqueeze(-1)], dim=-1)
    if not compact:
        return _ring_in_slots(rows[:, :, end - window:end], None, position, window, head_dim, feat)
    seen = valid.long().cumsum(-1)  # non-decreasing: searchsorted finds the position of each key
    wanted = seen[:, -1:] - window + 1 + torch.arange(window, device=rows.device)  # key numbers, oldest first
    index = torch.searchsorted(seen, wanted.clamp_min(1)).clamp(max=length - 1)
    kept = wanted >= 1  # a row with fewer than W keys leaves its oldest slots empty
    ordered = rows.gather(2, index[:, None, :, None].expand(batch, heads, window, cols)) * kept[:, None, :, None]
    return _ring_in_slots(ordered, kept, position, window, head_dim, feat)


def window_attention_step(phi_q: Tensor, phi_k: Tensor, v1: Tensor, q: Tensor, k: Tensor,
                          state: Optional[WindowState] = None, *, window: int, log_balance: Tensor,
                          log_g: Optional[Tensor] = None, padding: Optional[Tensor] = None,
                          inplace: bool = False) -> Tuple[Tensor, WindowState]:
    """One new position (time == 1), as a key/value cache: the new key goes to slot position mod W
    for every row, the key there before (the oldest) enters [S | z] from its stored phi(k); while
    fewer than W positions are read, the ring grows by one slot instead and nothing leaves. The query
    reads the ring (softmax) and [S | z] (linear). Constant cost once the ring is full.

    With ``inplace=True`` the given state's tensors are updated in place (nothing allocated for the
    state once the ring is full); callers that keep the old state for autograd or reuse leave it False.
    A step with padding is the parallel form's (a padded row keeps its keys while the others move on);
    decoding has none."""
    if padding is not None:
        return window_attention(phi_q, phi_k, v1, q, k, window=window, log_balance=log_balance,
                                initial_state=state, log_g=log_g, padding=padding)
    packed, keys, values, features, position, valid = empty_window_state(phi_q, v1, q) if state is None else state
    acc = packed.dtype
    k = k * k.size(-1) ** -0.5
    gate = None if log_g is None else log_g.to(acc).expand(q.size(0), q.size(1), 1)  # (b, h, 1)
    if not inplace:
        packed = packed.clone()
    if gate is not None:
        packed.mul_(gate.exp().unsqueeze(-1))
    if keys.size(2) < window:  # the ring grows, as a key/value cache would, and nothing leaves it
        if gate is not None:
            features = torch.cat([features[..., :-1], features[..., -1:] + gate.unsqueeze(-1)], dim=-1)
        keys, values = torch.cat([keys, k.to(acc)], dim=2), torch.cat([values, v1.to(acc)], dim=2)
        features = torch.cat([features, torch.nn.functional.pad(phi_k.to(acc), (0, 1))], dim=2)
        valid = None if valid is None else torch.cat([valid, valid.new_ones(valid.size(0), 1)], dim=1)
    else:
        slot = slice(position % window, position % window + 1)
        leaving_phi = features[:, :, slot, :-1]  # (b, h, 1, features)
        if gate is not None:  # the leaving key has aged by this step's gate too
            leaving_phi = leaving_phi * (features[:, :, slot, -1:] + gate.unsqueeze(-1)).exp()
        packed.addcmul_(leaving_phi.transpose(-1, -2), values[:, :, slot])  # an empty slot holds zeros
        if not inplace:
            keys, values, features = keys.clone(), values.clone(), features.clone()
            valid = None if valid is None else valid.clone()
        if gate is not None:
            features[..., -1].add_(gate)
            features[:, :, slot, -1] = 0.0
        keys[:, :, slot] = k  # copies convert to the ring's dtype
        values[:, :, slot] = v1
        features[:, :, slot, :-1] = phi_k
        if valid is not None:
            valid[:, slot] = True
    scores = q.to(acc) @ keys.transpose(-1, -2)  # (b, h, 1, slots)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], -torch.inf)
    out = _combine(scores, values, phi_q.to(acc) @ packed, _head_column(log_balance, acc, 4))
    return out.to(v1.dtype), WindowState(packed, keys, values, features, position + 1, valid)


def recurrent_window_attention(phi_q: Tensor, phi_k: Tensor, v1: Tensor, q: Tensor, k: Tensor, *, window: int,
                               log_balance: Tensor, initial_state: Optional[WindowState] = None,
                               log_g: Optional[Tensor] = None, padding: Optional[Tensor] = None
                               ) -> Tuple[Tensor, WindowState]:
    """Step by step over a whole sequence (reference for tests; what decoding computes)."""
    state = empty_window_state(phi_q, v1, q) if initial_state is None else initial_state
    time = q.size(2)
    if log_g is not None:
        log_g = log_g.expand(q.size(0), q.size(1), time)
    outs = []
    for t in range(time):
        step = slice(t, t + 1)
        out, state = window_attention_step(
            phi_q[:, :, step], phi_k[:, :, step], v1[:, :, step], q[:, :, step], k[:, :, step], state,
            window=window, log_balance=log_balance, log_g=None if log_g is None else log_g[:, :, step],
            padding=None if padding is None else padding[:, step])
        outs.append(out)
    return (torch.cat(outs, dim=2) if outs else v1.new_zeros(*v1.shape[:-1], v1.size(-1) - 1)), state


def naive_window_attention(phi_q: Tensor, phi_k: Tensor, v1: Tensor, q: Tensor, k: Tensor, *, window: int,
                           log_balance: Tensor, initial_state: Optional[WindowState] = None,
                           log_g: Optional[Tensor] = None, padding: Optional[Tensor] = None
                           ) -> Tuple[Tensor, WindowState]:
    """Quadratic reference, the definition written out (unshifted exp; tests only, float64): the
    initial ring's keys, oldest first, precede the new ones; the initial [S | z] is read with
    exp(c_i). The final ring is filled row by row."""
    batch, heads, time, head_dim = q.shape
    feat = phi_q.size(-1)
    state = empty_window_state(phi_q, v1, q) if initial_state is None else initial_state
    acc = state.packed.dtype
    valid_new = _valid(padding, batch, time, q.device)
    ring_rows, ring_valid = _ring_in_time_order(state, window)
    rows = torch.cat([ring_rows, _ring_entries(phi_k * valid_new[:, None, :, None], v1, k, acc)], dim=2)
    valid = torch.cat([ring_valid, valid_new], dim=1)
    a = torch.nn.functional.pad(_log_gates(log_g, batch, heads, time, valid_new, acc), (window, 0))
    keys, phi, values, age = _split_ring(rows, head_dim, feat)
    # c_i - c_j is the log-decay from key j to query i; a ring key has decayed by its age already.
    c = a.cumsum(-1) - torch.nn.functional.pad(age[..., :window], (0, time))
    c_query = c[..., window:]
    distance = torch.arange(window, window + time)[:, None] - torch.arange(window + time)[None, :]
    beta = _head_column(log_balance, acc, 4).exp()
    in_window = ((distance >= 0) & (distance < window))[None, None] & valid[:, None, None, :]
    softmax = (q.to(acc) @ keys.transpose(-1, -2)).masked_fill(~in_window, -torch.inf).exp()  # keys scaled
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
    rows = torch.cat([rows[..., :-1], (total - c).unsqueeze(-1)], dim=-1)
    ordered = torch.zeros_like(rows[:, :, :window])
    kept = torch.zeros(batch, window, dtype=torch.bool)
    for row in range(batch):  # the row's last W keys, the newest at the last position
        last = valid[row].nonzero()[-window:, 0]
        ordered[row, :, window - len(last):] = rows[row, :, last]
        kept[row, window - len(last):] = True
    keys, values, features, kept = _ring_in_slots(ordered, kept, state.position + time, window, head_dim, feat)
    return out.to(v1.dtype), WindowState(packed, keys, values, features, state.position + time, kept)
