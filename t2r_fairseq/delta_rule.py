"""The (gated) delta rule: a state that overwrites what it holds for a key instead of adding to it.
The math, in pure torch (no fairseq import).

    S_t = g_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T,      out_t = S_t^T q_t

(Schlag et al. 2021; DeltaNet, Yang et al. 2024; with the gate g_t, Gated DeltaNet, Yang et al. 2025).
The update first reads what S holds for k_t and replaces b_t of it by v_t: with unit-norm keys and
write strengths b_t in (0, 1), every step is a contraction, so the state stays bounded however long
the input. Without gates (log_g None) g_t = 1.

Shapes: q, k: (batch, heads, time, dk), k of unit L2 norm (callers normalise); v: (batch, heads,
time, dv), any width (a column of ones makes the state carry T2R's normaliser z, updated by the same
rule); beta: (batch, heads, time) write strengths; log_g: log-gates a_t = log g_t <= 0, broadcasting
to (batch, heads, time), or None; state: (batch, heads, dk, dv). Every form returns (out: (batch,
heads, time, dv) in v's dtype, final state), so a prefix runs in parallel and continues step by step.
A position with b_t = 0 and a_t = 0 (padding) leaves the state as it was.

Chunked form (the WY / UT representation). Within a chunk, write S_t = gamma_t S_0 + sum_{j<=t}
(gamma_t / gamma_j) k_j u_j^T with gamma_t = exp(c_t), c the cumulative log-gates in the chunk; the
pseudo-values u_t = b_t (v_t - g_t S_{t-1}^T k_t) solve one unit lower-triangular system per chunk,

    (I + diag(b) (tril(K K^T, -1) * G)) U = diag(b) (V - diag(gamma) K S_0),   G_tj = exp(c_t - c_j),

whose right side is linear in S_0: both parts are solved for every chunk at once, and only the
(cheap) recurrence S_0 -> S_C runs chunk after chunk. Gates stay in log space; every exponent taken
is <= 0. The state is accumulated in at least float32.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .linear_attention import DEFAULT_CHUNK_SIZE, accumulation_dtype


def _initial_state(k: Tensor, v: Tensor, state: Optional[Tensor]) -> Tensor:
    acc = accumulation_dtype(k)
    if state is not None:
        return state.to(acc)
    return k.new_zeros(*k.shape[:2], k.size(-1), v.size(-1), dtype=acc)


def _log_gates(log_g: Optional[Tensor], shape, like: Tensor) -> Tensor:
    return like.new_zeros(shape) if log_g is None else log_g.to(like.dtype).expand(shape)


def chunked_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, initial_state: Optional[Tensor] = None,
                       log_g: Optional[Tensor] = None, chunk_size: int = DEFAULT_CHUNK_SIZE
                       ) -> Tuple[Tensor, Tensor]:
    """Parallel within chunks, recurrent across them: T / chunk sequential steps of (dk x dv) size."""
    batch, heads, time, dk = k.shape
    dv = v.size(-1)
    state = _initial_state(k, v, initial_state)
    if time == 0:
        return v.new_zeros(batch, heads, 0, dv), state
    acc = state.dtype
    chunk = min(chunk_size, time)
    n = -(-time // chunk)
    pad = n * chunk - time
    a = _log_gates(log_g, (batch, heads, time), state)

    def chunks(x: Tensor) -> Tensor:  # (b, h, t, ...) -> (b, h, n, C, ...); padding: b = 0, a = 0, zero rows
        x = torch.nn.functional.pad(x.to(acc), (0, 0) * (x.dim() - 3) + (0, pad))
        return x.view(batch, heads, n, chunk, *x.shape[3:])

    qc, kc, vc, bc = chunks(q), chunks(k), chunks(v), chunks(beta)
    c = chunks(a).cumsum(-1)  # (b, h, n, C)
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=k.device).tril()
    decay = (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(~causal, -torch.inf).exp()  # G, 0 above the diagonal
    strictly_lower = (kc @ kc.transpose(-1, -2)) * decay * bc.unsqueeze(-1)
    system = torch.eye(chunk, dtype=acc, device=k.device) + strictly_lower.tril(-1)
    # U = U_v - W S_0 for each chunk: U_v from the values, W from the keys the state is read with.
    rhs = torch.cat([vc, kc * c.exp().unsqueeze(-1)], dim=-1) * bc.unsqueeze(-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_v, w = solved.split([dv, dk], dim=-1)
    reads = (qc @ kc.transpose(-1, -2)) * decay  # tril(Q K^T) * G
    q_initial = qc * c.exp().unsqueeze(-1)  # what reads the state before the chunk
    k_final = kc * (c[..., -1:] - c).exp().unsqueeze(-1)  # each key as it is left in the state after the chunk
    chunk_decay = c[..., -1].exp()  # (b, h, n)
    outs = []
    for i in range(n):
        u = u_v[:, :, i] - w[:, :, i] @ state
        outs.append(q_initial[:, :, i] @ state + reads[:, :, i] @ u)
        state = chunk_decay[:, :, i, None, None] * state + k_final[:, :, i].transpose(-1, -2) @ u
    out = torch.stack(outs, dim=2).view(batch, heads, n * chunk, dv)[:, :, :time]
    return out.to(v.dtype), state


def delta_rule_step(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, state: Optional[Tensor] = None, *,
                    log_g: Optional[Tensor] = None, inplace: bool = False) -> Tuple[Tensor, Tensor]:
    """One position (time == 1): decay, read what the state holds for k, write b of the difference.
    Two mat-vecs whatever the prefix. inplace=True updates the given state (decoding, no autograd)."""
    state = _initial_state(k, v, state)
    acc = state.dtype
    qf, kf, vf, bf = q.to(acc), k.to(acc), v.to(acc), beta.to(acc)[..., None]  # (b, h, 1, .)
    gate = None if log_g is None else log_g.to(acc).exp()[..., None]
    if inplace:
        if gate is not None:
            state.mul_(gate)
        state.addcmul_(kf.transpose(-1, -2), bf * (vf - kf @ state))  # S += k (b (v - S^T k))^T
    else:
        if gate is not None:
            state = state * gate
        state = torch.addcmul(state, kf.transpose(-1, -2), bf * (vf - kf @ state))
    return (qf @ state).to(v.dtype), state


def naive_delta_rule(q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, initial_state: Optional[Tensor] = None,
                     log_g: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The recurrence token by token, written out (reference for tests)."""
    state = _initial_state(k, v, initial_state)
    acc = state.dtype
    batch, heads, time, dk = k.shape
    a = _log_gates(log_g, (batch, heads, time), state)
    eye = torch.eye(dk, dtype=acc, device=k.device)
    outs = []
    for t in range(time):
        kt, vt = k[:, :, t].to(acc), v[:, :, t].to(acc)  # (b, h, dk), (b, h, dv)
        bt, gt = beta[:, :, t].to(acc)[..., None, None], a[:, :, t].exp()[..., None, None]
        erase = eye - bt * kt.unsqueeze(-1) * kt.unsqueeze(-2)
        state = gt * (erase @ state) + bt * kt.unsqueeze(-1) * vt.unsqueeze(-2)
        outs.append((q[:, :, t].to(acc).unsqueeze(-2) @ state).squeeze(-2))
    out = torch.stack(outs, dim=2) if outs else v.new_zeros(batch, heads, 0, v.size(-1))
    return out.to(v.dtype), state
