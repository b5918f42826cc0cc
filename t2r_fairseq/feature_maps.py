"""Feature maps phi for linear attention, applied per head to queries and keys alike.

Each map takes x: (batch, heads, time, head_dim) and returns (batch, heads, time, feature_dim).
``build_feature_map(name, num_heads, head_dim, feature_dim)`` is the only constructor callers need.
"""
import math

import torch
from torch import Tensor, nn

FEATURE_MAPS = ("t2r", "elu", "rfa", "hedgehog", "performer")


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


class HedgehogFeatureMap(nn.Module):
    """Hedgehog (Zhang et al., 2024): phi(x) = [softmax(W x + b), softmax(-(W x + b))] over the
    features, W: (feature_dim x head_dim) per head; 2 * feature_dim features. Softmax keeps the
    spiky, monotone weighting of softmax attention that relu maps lose."""

    def __init__(self, num_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.projection = T2RFeatureMap(num_heads, head_dim, feature_dim)
        self.feature_dim = 2 * feature_dim

    def forward(self, x: Tensor) -> Tensor:
        proj = self.projection
        z = torch.einsum("bhtd,hfd->bhtf", x, proj.weight.to(x.dtype)) + proj.bias.to(x.dtype)[:, None, :]
        return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


class PerformerFeatureMap(nn.Module):
    """Performer FAVOR+ positive random features (Choromanski et al., 2021):
    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4), W: m Gaussian rows per head
    (orthogonalized in blocks), a fixed buffer; phi(q).phi(k) estimates exp(q.k / sqrt(d))."""

    MAX_EXPONENT = 30.0  # exp(30) ~ 1e13: keeps float32 (and the normalizer sum) finite

    def __init__(self, num_heads: int, head_dim: int, num_features: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        blocks = []
        for _ in range(num_heads):
            rows = []
            while sum(r.size(0) for r in rows) < num_features:
                q, _ = torch.linalg.qr(torch.randn(head_dim, head_dim, generator=generator))
                rows.append(q.T)
            w = torch.cat(rows)[:num_features]
            # Orthogonal rows with Gaussian norms: same marginals as i.i.d. Gaussian, lower variance.
            norms = torch.randn(num_features, head_dim, generator=generator).norm(dim=-1, keepdim=True)
            blocks.append(w * norms)
        self.register_buffer("projection", torch.stack(blocks))
        self.feature_dim = num_features

    def forward(self, x: Tensor) -> Tensor:
        x = x * x.size(-1) ** -0.25
        proj = torch.einsum("bhtd,hfd->bhtf", x, self.projection.to(x.dtype))
        exponent = (proj - 0.5 * x.pow(2).sum(-1, keepdim=True)).clamp(max=self.MAX_EXPONENT)
        return exponent.exp() * self.feature_dim ** -0.5


def build_feature_map(name: str, num_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    if feature_dim <= 0:
        raise ValueError(f"--t2r-feature-dim must be positive, got {feature_dim}")
    if name == "t2r":
        return T2RFeatureMap(num_heads, head_dim, feature_dim)
    if name == "elu":
        return EluFeatureMap(head_dim)
    if name == "rfa":
        return RandomFourierFeatureMap(num_heads, head_dim, feature_dim)
    if name == "hedgehog":
        return HedgehogFeatureMap(num_heads, head_dim, feature_dim)
    if name == "performer":
        return PerformerFeatureMap(num_heads, head_dim, feature_dim)
    raise ValueError(f"unknown --t2r-feature-map {name!r}; choose one of {', '.join(FEATURE_MAPS)}")
