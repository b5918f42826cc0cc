"""Feature maps phi for linear attention, applied per head to queries and keys alike.

Each map takes x: (batch, heads, time, head_dim) and returns (batch, heads, time, feature_dim).
``build_feature_map(name, num_heads, head_dim, feature_dim)`` is the only constructor callers need.
"""
import math

import torch
from torch import Tensor, nn

FEATURE_MAPS = ("t2r", "elu", "rfa")


class T2RFeatureMap(nn.Module):
    """phi(x) = relu(W x + b), W: (feature_dim x head_dim) per head (Kasai et al., 2021)."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, feature_dim, head_dim))
        self.bias = nn.Parameter(torch.empty(num_heads, feature_dim))
        self.feature_dim = feature_dim
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's default init, per head.
        bound = 1.0 / math.sqrt(self.weight.size(-1))
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(torch.einsum("bhtd,hfd->bhtf", x, self.weight.to(x.dtype))
                          + self.bias.to(x.dtype)[:, None, :])


class EluFeatureMap(nn.Module):
    """phi(x) = elu(x) + 1 (Katharopoulos et al., 2020); feature_dim = head_dim, no parameters."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.feature_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.elu(x) + 1.0


class RandomFourierFeatureMap(nn.Module):
    """RFA (Peng et al., 2021): phi(x) = [sin(W x'), cos(W x')] / sqrt(n) with x' = x / |x| / sigma,
    W ~ N(0, I) fixed (a buffer, saved with the checkpoint), sigma learned per head.
    ``num_features`` random projections give 2 * num_features features."""

    def __init__(self, num_heads: int, head_dim: int, num_features: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(num_heads, num_features, head_dim, generator=generator))
        self.log_sigma = nn.Parameter(torch.zeros(num_heads))
        self.feature_dim = 2 * num_features

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.normalize(x, dim=-1) / self.log_sigma.exp().to(x.dtype)[None, :, None, None]
        proj = torch.einsum("bhtd,hfd->bhtf", x, self.projection.to(x.dtype))
        scale = 1.0 / math.sqrt(self.projection.size(1))
        return torch.cat([proj.sin(), proj.cos()], dim=-1) * scale


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    if feature_dim <= 0:
        raise ValueError(f"--t2r-feature-dim must be positive, got {feature_dim}")
    if name == "t2r":
        return T2RFeatureMap(num_heads, head_dim, feature_dim)
    if name == "elu":
        return EluFeatureMap(head_dim)
    if name == "rfa":
        return RandomFourierFeatureMap(num_heads, head_dim, feature_dim)
    raise ValueError(f"unknown --t2r-feature-map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
