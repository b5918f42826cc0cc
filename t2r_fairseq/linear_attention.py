"""Causal linear attention: the math, in pure torch (no fairseq import).

All forms share one contract. Inputs are already feature-mapped:

    q, k: (batch, heads, time, features)   phi(queries), phi(keys), non-negative for the
                                            usual feature maps
    v:    (batch, heads, time, dim)
    state: (S, z) with S: (batch, heads, features, dim), z: (batch, heads, features), or None
    log_g: (batch, heads, time) finite log-gates a_t = log g_t <= 0 (decay on the state), or None
           for no decay; anything that broadcasts to that shape (a per-head constant: (1, heads, 1))

and each returns ``(out, final_state)`` with ``out: (batch, heads, time, dim)`` in v's dtype, so
a prefix can be run in parallel and then continued step by step:

    out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),
    S_t = g_t S_{t-1} + phi(k_t) v_t^T,    z_t = g_t z_{t-1} + phi(k_t)    (g_t = 1 without log_g).

Decay is computed in log space: a product of gates is exp of a sum of log-gates, and every
exponent taken is <= 0 (exp(c_i - c_j) only for i >= j), so nothing overflows however long the
input, and nothing underflows but weights that are negligible anyway (a cumprod of 64 gates would).

The packed_* forms are the same computation on a packed state [S | z] of (batch, heads,
features, dim + 1) and values with a column of ones, v1 = [v | 1]: one product k^T v1 adds to S
and z at once, and one product q [S | z] yields numerator and denominator at once. The attention
modules use only these; the plain forms wrap them.

S and z are accumulated in at least float32 (float64 stays float64): the normalizer grows with
length and half precision would lose the new tokens' contributions.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

State = Tuple[Tensor, Tensor]

DEFAULT_CHUNK_SIZE = 64
DEFAULT_EPS = 1e-6


def _normalize(numerator: Tensor, denominator: Tensor, eps: float) -> Tensor:
    # |den| keeps sign-indefinite maps (random Fourier features) from dividing by ~0 from below;
    # for non-negative maps it is the identity. eps guards all-zero relu features.
    return numerator / (denominator.abs() + eps).unsqueeze(-1)


def normalize_packed(both: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """[numerator | denominator]: (..., dim + 1) -> (..., dim)."""
    return _normalize(both[..., :-1], both[..., -1], eps)


def accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def with_ones_column(v: Tensor) -> Tensor:
    """v: (..., dim) -> v1 = [v | 1]: (..., dim + 1), the values the packed forms take."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def pack_state(state: State) -> Tensor:
    """(S, z) -> one (batch, heads, features, dim + 1) tensor [S | z]."""
    return torch.cat([state[0], state[1].unsqueeze(-1)], dim=-1)


def unpack_state(packed: Tensor) -> State:
    """(S, z) as views of a packed state: writing to them writes to it."""
    return packed[..., :-1], packed[..., -1]


def _initial_packed(q: Tensor, width: int, state: Optional[Tensor]) -> Tensor:
    acc = accumulation_dtype(q)
    if state is not None:
        return state.to(acc)
    b, h, _, f = q.shape
    return q.new_zeros(b, h, f, width, dtype=acc)


def packed_causal_linear_attention(q: Tensor, k: Tensor, v1: Tensor, *, initial_state: Optional[Tensor] = None,
                                   log_g: Optional[Tensor] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                                   eps: float = DEFAULT_EPS) -> Tuple[Tensor, Tensor]:
    """Chunked parallel form: O(T * chunk) memory, never a T x T matrix nor per-position states.

    Inside a chunk the causal part is a masked (chunk x chunk) product; across chunks each chunk
    reads the running state accumulated from all chunks before it (an exclusive cumsum over
    per-chunk k^T v1 sums, so only T/chunk states exist at once). A chunk is never longer than the
    sequence: chunk_size >= T is the quadratic form in one chunk.

    With decay, c_t is the cumulative sum of log-gates inside a chunk: position i reads key j of
    its chunk with weight exp(c_i - c_j), the state before the chunk with exp(c_i), and a chunk
    adds to the state after it k_j v1_j^T exp(c_last - c_j); states move across chunks by
    chunk_states.

    v1: (batch, heads, time, dim + 1); initial_state: packed, or None. Returns (out: (batch,
    heads, time, dim), final packed state: a new tensor).
    """
    batch, heads, time, feat = q.shape
    width = v1.size(-1)
    running = _initial_packed(q, width, initial_state)
    if time == 0:
        return v1.new_zeros(batch, heads, 0, width - 1), running
    acc = running.dtype
    out_dtype = v1.dtype
    chunk_size = min(chunk_size, time)
    q, k, v1 = q.to(acc), k.to(acc), v1.to(acc)
    n_chunks = -(-time // chunk_size)
    pad = n_chunks * chunk_size - time
    if pad:
        # Zero keys/values in the padding contribute nothing to any state or output (and their
        # log-gates, zero, decay nothing).
        q, k, v1 = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v1))
    qc = q.view(batch, heads, n_chunks, chunk_size, feat)
    kc = k.view(batch, heads, n_chunks, chunk_size, feat)
    vc = v1.view(batch, heads, n_chunks, chunk_size, width)
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    scores = qc @ kc.transpose(-1, -2)

    if log_g is None:
        chunk_kv = kc.transpose(-1, -2) @ vc                   # (b, h, n, feat, dim + 1)
        before_chunk, final = chunk_states(chunk_kv, running)
        scores = scores.masked_fill(~causal, 0.0)
    else:
        a = torch.nn.functional.pad(log_g.to(acc).expand(batch, heads, time), (0, pad))
        c = a.view(batch, heads, n_chunks, chunk_size).cumsum(dim=-1)  # (b, h, n, chunk)
        chunk_kv = (kc * (c[..., -1:] - c).exp().unsqueeze(-1)).transpose(-1, -2) @ vc
        before_chunk, final = chunk_states(chunk_kv, running, c[..., -1])
        scores = scores * (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~causal, -torch.inf).exp()
        qc = qc * c.exp().unsqueeze(-1)

    numerator = scores @ vc + qc @ before_chunk               # (b, h, n, chunk, dim + 1)
    numerator = numerator.view(batch, heads, n_chunks * chunk_size, width)[:, :, :time]
    # A copy, not a view: a state kept for decoding must not hold all the chunks' states alive.
    final = final.clone(memory_format=torch.contiguous_format)
    return normalize_packed(numerator, eps).to(out_dtype), final


def _segment_sums(x: Tensor) -> Tensor:
    """x: (..., n) -> (..., n, n) with [i, j] = x_{j+1} + ... + x_i for i >= j (0 on the diagonal)
    and -inf above it, summed segment by segment (Mamba-2's segsum), not as a difference of two
    long cumulative sums, which would lose the short segments' precision to the long ones'."""
    n = x.size(-1)
    lower = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    sums = x.unsqueeze(-1).expand(*x.shape, n).masked_fill(~lower.tril(-1), 0.0).cumsum(dim=-2)
    return sums.masked_fill(~lower, -torch.inf)


def chunk_states(chunk_kv: Tensor, initial: Tensor, chunk_log_decay: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The packed state before each chunk and after the last one, from each chunk's own sum
    chunk_kv_m (its keys as they are at its end) and the state before the first: without decay an
    exclusive cumulative sum; with it, before chunk n, exp(a_0 + ... + a_{n-1}) initial +
    sum_{m<n} exp(a_{m+1} + ... + a_{n-1}) chunk_kv_m, where a_m is chunk m's total log-decay: one
    (n+1) x (n+1) weighted sum over [initial, chunk_kv_0, ...] instead of a scan (the chunk count is
    T / chunk, small). Every chunked form (linear_attention.py's, window_attention.py's) uses it.

    chunk_kv: (b, h, n, feat, width); initial: (b, h, feat, width); chunk_log_decay: (b, h, n) or None.
    Returns (before each chunk: (b, h, n, feat, width), final: (b, h, feat, width))."""
    if chunk_log_decay is None:
        inclusive = chunk_kv.cumsum(dim=2) + initial.unsqueeze(2)
        return torch.cat([initial.unsqueeze(2), inclusive[:, :, :-1]], dim=2), inclusive[:, :, -1]
    b, h, n, feat, width = chunk_kv.shape
    sources = torch.cat([initial.unsqueeze(2), chunk_kv], dim=2)
    weights = _segment_sums(torch.nn.functional.pad(chunk_log_decay, (1, 0))).exp()  # (b, h, n+1, n+1)
    states = (weights @ sources.flatten(-2)).view(b, h, n + 1, feat, width)
    return states[:, :, :-1], states[:, :, -1]


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Optional[State] = None,
                            log_g: Optional[Tensor] = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                            eps: float = DEFAULT_EPS) -> Tuple[Tensor, State]:
    """packed_causal_linear_attention on v and (S, z)."""
    out, final = packed_causal_linear_attention(
        q, k, with_ones_column(v), initial_state=None if initial_state is None else pack_state(initial_state),
        log_g=log_g, chunk_size=chunk_size, eps=eps)
    return out, unpack_state(final)


def packed_linear_attention_step(q: Tensor, k: Tensor, v1: Tensor, state: Optional[Tensor] = None, *,
                                 log_g: Optional[Tensor] = None, eps: float = DEFAULT_EPS,
                                 inplace: bool = False) -> Tuple[Tensor, Tensor]:
    """Recurrent form for one new position (time == 1), on a packed state: constant cost whatever the
    prefix length, three kernels for the whole recurrence (an update and one matmul serve both S
    and z), which is what a decode step costs beyond the projections; with log_g, the state is
    first scaled by g (one more).

    With ``inplace=True`` the given state is updated in place (no allocation per decode step);
    callers that keep the old state for autograd or reuse must leave it False.
    Returns (out: (batch, heads, 1, dim), packed state).
    """
    packed = _initial_packed(q, v1.size(-1), state)
    acc = packed.dtype
    qf, kf, vf = q.to(acc), k.to(acc), v1.to(acc)
    if inplace and packed is state:
        if log_g is not None:
            packed.mul_(log_g.to(acc).exp()[..., None])
        packed.addcmul_(kf.transpose(-1, -2), vf)
    else:
        if log_g is not None:
            packed = packed * log_g.to(acc).exp()[..., None]
        packed = torch.addcmul(packed, kf.transpose(-1, -2), vf)
    return normalize_packed(qf @ packed, eps).to(v1.dtype), packed


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: Optional[State] = None, *,
                          log_g: Optional[Tensor] = None, eps: float = DEFAULT_EPS) -> Tuple[Tensor, State]:
    """packed_linear_attention_step on v and (S, z)."""
    out, packed = packed_linear_attention_step(q, k, with_ones_column(v), None if state is None else pack_state(state),
                                               log_g=log_g, eps=eps)
    return out, unpack_state(packed)


def recurrent_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Optional[State] = None,
                               log_g: Optional[Tensor] = None, eps: float = DEFAULT_EPS) -> Tuple[Tensor, State]:
    """Step-by-step form over a whole sequence (reference for tests; what decoding computes)."""
    v1 = with_ones_column(v)
    packed = _initial_packed(q, v1.size(-1), None if initial_state is None else pack_state(initial_state))
    if log_g is not None:
        log_g = log_g.expand(*q.shape[:3])
    outs = []
    for t in range(q.size(2)):
        out, packed = packed_linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v1[:, :, t:t + 1], packed,
                                                   log_g=None if log_g is None else log_g[:, :, t:t + 1], eps=eps)
        outs.append(out)
    return (torch.cat(outs, dim=2) if outs else v.new_zeros(*v.shape)), unpack_state(packed)


def naive_causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Optional[State] = None,
                                  log_g: Optional[Tensor] = None, eps: float = DEFAULT_EPS) -> Tuple[Tensor, State]:
    """Quadratic reference: materializes the T x T causal kernel matrix, decay included, S and z
    kept apart. Tests only.

    With c_t = a_1 + ... + a_t (c = 0 without decay): out_i reads key j <= i with weight
    exp(c_i - c_j) and the initial state with exp(c_i); the final state is exp(c_T) S_0 +
    sum_j exp(c_T - c_j) k_j v_j^T."""
    acc = accumulation_dtype(q)
    b, h, time, f = q.shape
    if initial_state is None:
        initial_state = (q.new_zeros(b, h, f, v.size(-1), dtype=acc), q.new_zeros(b, h, f, dtype=acc))
    s0, z0 = initial_state[0].to(acc), initial_state[1].to(acc)
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    a = q.new_zeros(b, h, time, dtype=acc) if log_g is None else log_g.to(acc).expand(b, h, time)
    c, total = a.cumsum(-1), a.sum(-1, keepdim=True)
    causal = torch.ones(time, time, dtype=torch.bool, device=q.device).tril()
    decay = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~causal, -torch.inf).exp()
    scores = (qf @ kf.transpose(-1, -2)) * decay
    q_initial = qf * c.exp().unsqueeze(-1)       # what reads the decayed initial state
    k_final = kf * (total - c).exp().unsqueeze(-1)  # each key as it is left in the final state
    numerator = scores @ vf + q_initial @ s0
    denominator = scores.sum(-1) + (q_initial * z0.unsqueeze(2)).sum(-1)
    out = _normalize(numerator, denominator, eps)
    kept = total.exp().unsqueeze(-1)
    final = (kept * s0 + k_final.transpose(-1, -2) @ vf, kept.squeeze(-1) * z0 + k_final.sum(2))
    return out.to(v.dtype), final


def packed_linear_attention_state(k: Tensor, v1: Tensor) -> Tensor:
    """Non-causal packed state [S | z] = k^T v1 over a whole sequence (cross-attention over the
    source), accumulated in at least float32. Padded positions must already be zero in k."""
    acc = accumulation_dtype(k)
    return k.to(acc).transpose(-1, -2) @ v1.to(acc)


def packed_linear_attention_read(q: Tensor, packed: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Read a fixed packed state with queries q: (batch, heads, time, features) -> (batch, heads, time, dim)."""
    return normalize_packed(q.to(packed.dtype) @ packed, eps).to(q.dtype)
