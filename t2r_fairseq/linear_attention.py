"""Causal linear attention: the math, in pure torch (no fairseq import).

All forms share one contract. Inputs are already feature-mapped:

    q, k: (batch, heads, time, features)   phi(queries), phi(keys), non-negative for the
                                            usual feature maps
    v:    (batch, heads, time, dim)
    state: (S, z) with S: (batch, heads, features, dim), z: (batch, heads, features), or None

and each returns ``(out, final_state)`` with ``out: (batch, heads, time, dim)`` in v's dtype, so
a prefix can be run in parallel and then continued step by step:

    out_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps),
    S_t = S_0 + sum_{j<=t} phi(k_j) v_j^T,    z_t = z_0 + sum_{j<=t} phi(k_j).

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


def accumulation_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _initial_state(q: Tensor, v: Tensor, state: Optional[State]) -> State:
    acc = accumulation_dtype(q)
    if state is not None:
        return state[0].to(acc), state[1].to(acc)
    b, h, _, f = q.shape
    return q.new_zeros(b, h, f, v.size(-1), dtype=acc), q.new_zeros(b, h, f, dtype=acc)


def causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Optional[State] = None,
                            chunk_size: int = DEFAULT_CHUNK_SIZE, eps: float = DEFAULT_EPS
                            ) -> Tuple[Tensor, State]:
    """Chunked parallel form: O(T * chunk) memory, never a T x T matrix nor per-position states.

    Inside a chunk the causal part is a masked (chunk x chunk) product; across chunks each chunk
    reads the running state accumulated from all chunks before it (an exclusive cumsum over
    per-chunk k^T v sums, so only T/chunk states exist at once).
    """
    out_dtype = v.dtype
    batch, heads, time, feat = q.shape
    dim = v.size(-1)
    s0, z0 = _initial_state(q, v, initial_state)
    if time == 0:
        return v.new_zeros(batch, heads, 0, dim), (s0, z0)
    acc = s0.dtype
    q, k, v = q.to(acc), k.to(acc), v.to(acc)
    n_chunks = -(-time // chunk_size)
    pad = n_chunks * chunk_size - time
    if pad:
        # Zero keys/values in the padding contribute nothing to any state or output.
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    # A column of ones appended to v makes the normalizer z ride along with S in every product.
    v = torch.cat([v, v.new_ones(batch, heads, v.size(2), 1)], dim=-1)
    qc = q.view(batch, heads, n_chunks, chunk_size, feat)
    kc = k.view(batch, heads, n_chunks, chunk_size, feat)
    vc = v.view(batch, heads, n_chunks, chunk_size, dim + 1)

    chunk_kv = kc.transpose(-1, -2) @ vc                       # (b, h, n, feat, dim + 1)
    running = torch.cat([s0, z0.unsqueeze(-1)], dim=-1).unsqueeze(2)
    inclusive = chunk_kv.cumsum(dim=2) + running
    before_chunk = torch.cat([running, inclusive[:, :, :-1]], dim=2)

    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    scores = (qc @ kc.transpose(-1, -2)).masked_fill(~causal, 0.0)
    numerator = scores @ vc + qc @ before_chunk               # (b, h, n, chunk, dim + 1)
    numerator = numerator.view(batch, heads, n_chunks * chunk_size, dim + 1)[:, :, :time]
    out = _normalize(numerator[..., :dim], numerator[..., dim], eps)
    final = inclusive[:, :, -1]
    return out.to(out_dtype), (final[..., :dim], final[..., dim])


def linear_attention_step(q: Tensor, k: Tensor, v: Tensor, state: Optional[State] = None, *,
                          eps: float = DEFAULT_EPS, inplace: bool = False) -> Tuple[Tensor, State]:
    """Recurrent form for one new position (time == 1): constant cost whatever the prefix length.

    With ``inplace=True`` the given state tensors are updated in place (no allocation per decode
    step); callers that keep the old state for autograd or reuse must leave it False.
    """
    s, z = _initial_state(q, v, state)
    # Kept as (b, h, 1, .) rows so that every product below is one batched matmul and the output
    # comes out in its final shape: a decode step is a handful of kernel launches.
    qf, kf, vf = (t.to(s.dtype) for t in (q, k, v))
    k_col = kf.transpose(-1, -2)                                # (b, h, features, 1)
    if inplace and state is not None and s is state[0] and z is state[1]:
        s.addcmul_(k_col, vf)
        z.add_(kf[:, :, 0])
    else:
        s, z = torch.addcmul(s, k_col, vf), z + kf[:, :, 0]
    numerator = qf @ s                                          # (b, h, 1, dim)
    denominator = qf @ z.unsqueeze(-1)                          # (b, h, 1, 1)
    out = numerator / (denominator.abs() + eps)                 # as _normalize
    return out.to(v.dtype), (s, z)


def pack_state(state: State) -> Tensor:
    """(S, z) -> one (batch, heads, features, dim + 1) tensor [S | z]: the decode state attention
    modules keep, so that one update and one matmul serve both S and z."""
    return torch.cat([state[0], state[1].unsqueeze(-1)], dim=-1)


def unpack_state(packed: Tensor) -> State:
    """(S, z) as views of a packed state: writing to them writes to it."""
    return packed[..., :-1], packed[..., -1]


def packed_linear_attention_step(q: Tensor, k: Tensor, v1: Tensor, packed: Tensor, *, eps: float = DEFAULT_EPS,
                                 inplace: bool = False) -> Tuple[Tensor, Tensor]:
    """linear_attention_step on a packed state [S | z] with v1 = [v | 1]: (batch, heads, 1, dim + 1).
    The update k [v | 1]^T adds to S and z at once and q [S | z] yields numerator and denominator
    in one matmul: three kernels for the whole recurrence, which is what a decode step costs
    beyond the projections. Returns (out: (batch, heads, 1, dim), packed)."""
    acc = packed.dtype
    qf, kf, vf = q.to(acc), k.to(acc), v1.to(acc)
    if inplace:
        packed.addcmul_(kf.transpose(-1, -2), vf)
    else:
        packed = torch.addcmul(packed, kf.transpose(-1, -2), vf)
    both = qf @ packed
    out = both[..., :-1] / (both[..., -1:].abs() + eps)  # as _normalize
    return out.to(v1.dtype), packed


def recurrent_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Optional[State] = None,
                               eps: float = DEFAULT_EPS) -> Tuple[Tensor, State]:
    """Step-by-step form over a whole sequence (reference for tests; what decoding computes)."""
    state = initial_state
    outs = []
    for t in range(q.size(2)):
        out, state = linear_attention_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, eps=eps)
        outs.append(out)
    state = _initial_state(q, v, state)
    return (torch.cat(outs, dim=2) if outs else v.new_zeros(*v.shape)), state


def naive_causal_linear_attention(q: Tensor, k: Tensor, v: Tensor, *, initial_state: Optional[State] = None,
                                  eps: float = DEFAULT_EPS) -> Tuple[Tensor, State]:
    """Quadratic reference: materializes the T x T causal kernel matrix. Tests only."""
    s0, z0 = _initial_state(q, v, initial_state)
    qf, kf, vf = q.to(s0.dtype), k.to(s0.dtype), v.to(s0.dtype)
    time = q.size(2)
    causal = torch.ones(time, time, dtype=torch.bool, device=q.device).tril()
    scores = (qf @ kf.transpose(-1, -2)).masked_fill(~causal, 0.0)
    numerator = scores @ vf + qf @ s0
    denominator = scores.sum(-1) + (qf * z0.unsqueeze(2)).sum(-1)
    out = _normalize(numerator, denominator, eps)
    final = (s0 + kf.transpose(-1, -2) @ vf, z0 + kf.sum(2))
    return out.to(v.dtype), final


def linear_attention_state(k: Tensor, v: Tensor) -> State:
    """Non-causal state over a whole sequence (cross-attention over the source): (S, z), accumulated
    in at least float32. Padded positions must already be zero in k."""
    acc = accumulation_dtype(k)
    kf = k.to(acc)
    return kf.transpose(-1, -2) @ v.to(acc), kf.sum(2)


def linear_attention_read(q: Tensor, state: State, eps: float = DEFAULT_EPS) -> Tensor:
    """Read a fixed state with queries q: (batch, heads, time, features) -> (batch, heads, time, dim)."""
    s, z = state
    qf = q.to(s.dtype)
    out = _normalize(qf @ s, (qf * z.unsqueeze(2)).sum(-1), eps)
    return out.to(q.dtype)
