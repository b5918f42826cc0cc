"""Decay on the state of causal self-attention: per-head log-gates a_t = log g_t < 0 for
S_t = g_t S_{t-1} + phi(k_t) v_t^T and z_t = g_t z_{t-1} + phi(k_t) (linear_attention.py's log_g).

    fixed    a constant g per head, RetNet's spread g_h = 1 - 2^-(5 + h): a buffer, no parameters
    learned  one trainable g per head, log g = logsigmoid(logit): always in (0, 1)
    gated    g_t from the layer input at each position (as GLA, Mamba-2): log g_t = logsigmoid(w_h.x_t + b_h);
             w and b are rows of the attention's fused input projection, so the gate costs no extra matmul

learned and gated start close to 1, g_h = 1 - 1/(M 2^h) (and w = 0): head h first remembers about
M 2^h tokens (--t2r-decay-memory M, default 256), so a model converted from a softmax checkpoint
starts where plain T2R starts. Log-gates are computed in at least float32
whatever the weights' dtype: 1 - g is below half precision's resolution near 1.
"""
import math
from typing import Optional

import torch
from torch import Tensor, nn

from .linear_attention import accumulation_dtype

DECAYS = ("none", "fixed", "learned", "gated")

FIXED_FIRST_EXPONENT = 5     # RetNet: g = 1 - 2^-5 (memory ~32 tokens) for the first head, ...
DEFAULT_MEMORY = 256        # ... and 1 - 1/256 for the first learned or gated one (--t2r-decay-memory)


def _head_exponents(num_heads: int, first: int) -> Tensor:
    """e_h = first + h: g_h = 1 - 2^-e_h, one octave of memory length apart from head to head."""
    return torch.arange(first, first + num_heads, dtype=torch.float32)


def _logit(exponents: Tensor) -> Tensor:
    """logit(1 - 2^-e) = log(2^e - 1): the logit whose logsigmoid is log(1 - 2^-e)."""
    return torch.log(torch.exp2(exponents.double()) - 1).float()


class FixedDecay(nn.Module):
    """RetNet's fixed per-head decay. The buffer holds the exponents e_h (small integers, exact in
    any dtype, so casting the model to half precision changes no gate); log g is made from them in
    at least float32."""
    from_input = False

    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("exponent", _head_exponents(num_heads, FIXED_FIRST_EXPONENT))

    def log_gates(self, gate_logits: Optional[Tensor] = None) -> Tensor:
        """-> (1, heads, 1), to broadcast over batch and time."""
        return torch.log1p(-torch.exp2(-self.exponent.to(accumulation_dtype(self.exponent))))[None, :, None]


class LearnedDecay(nn.Module):
    """One trainable gate per head, g = sigmoid(logit)."""
    from_input = False

    def __init__(self, num_heads: int, memory: int = DEFAULT_MEMORY):
        super().__init__()
        self.logit = nn.Parameter(_logit(_head_exponents(num_heads, math.log2(memory))))

    def log_gates(self, gate_logits: Optional[Tensor] = None) -> Tensor:
        """-> (1, heads, 1), to broadcast over batch and time."""
        return nn.functional.logsigmoid(self.logit.to(accumulation_dtype(self.logit)))[None, :, None]


class GatedDecay(nn.Module):
    """A gate per head and position from the layer input: g_t = sigmoid(weight x_t + bias), weight:
    (heads, embed). The attention module computes weight x_t + bias in its fused input matmul and
    passes those logits to log_gates."""
    from_input = True

    def __init__(self, num_heads: int, embed_dim: int, memory: int = DEFAULT_MEMORY):
        super().__init__()
        # Zero weight: every position starts with the same gate, close to 1; gradients still reach it.
        self.weight = nn.Parameter(torch.zeros(num_heads, embed_dim))
        self.bias = nn.Parameter(_logit(_head_exponents(num_heads, math.log2(memory))))

    def log_gates(self, gate_logits: Optional[Tensor] = None) -> Tensor:
        """gate_logits: (time, batch, heads) -> (batch, heads, time)."""
        return nn.functional.logsigmoid(gate_logits.to(accumulation_dtype(gate_logits))).permute(1, 2, 0)


def build_decay(name: str, num_heads: int, embed_dim: int, memory: int = DEFAULT_MEMORY) -> Optional[nn.Module]:
    """The decay module for --t2r-decay `name` (learned and gated first remembering ~memory 2^h
    tokens in head h); None for none (no decay, no tensors)."""
    if name == "none":
        return None
    if name == "fixed":
        return FixedDecay(num_heads)
    if name == "learned":
        return LearnedDecay(num_heads, memory)
    if name == "gated":
        return GatedDecay(num_heads, embed_dim, memory)
    raise ValueError(f"unknown --t2r-decay {name!r}; choose one of {', '.join(DECAYS)}")
