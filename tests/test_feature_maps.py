"""Feature maps: shapes, non-negativity where the math needs it, and what each one estimates."""
import pytest
import torch

from t2r_fairseq.feature_maps import FEATURE_MAPS, build_feature_map


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_shapes_and_finite(name):
    phi = build_feature_map(name, num_heads=3, head_dim=16, feature_dim=8)
    x = torch.randn(2, 3, 5, 16) * 4
    out = phi(x)
    assert out.shape == (2, 3, 5, phi.feature_dim) and torch.isfinite(out).all()
    if name != "rfa":  # all but random Fourier features are non-negative: a valid normalizer
        assert (out >= 0).all()


def test_performer_estimates_softmax_kernel():
    torch.manual_seed(0)
    phi = build_feature_map("performer", num_heads=1, head_dim=8, feature_dim=4096)
    q, k = torch.randn(1, 1, 6, 8) * 0.5, torch.randn(1, 1, 6, 8) * 0.5
    estimate = phi(q) @ phi(k).transpose(-1, -2)
    # Per-query estimation error is shared by all keys and cancels in the normalizer: compare
    # the attention weights linear attention actually uses.
    exact = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    torch.testing.assert_close(estimate / estimate.sum(-1, keepdim=True), exact, rtol=0.1, atol=0.02)


def test_rfa_estimates_gaussian_kernel_of_normalized_inputs():
    phi = build_feature_map("rfa", num_heads=1, head_dim=8, feature_dim=8192)
    q, k = torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 8)
    qn, kn = (torch.nn.functional.normalize(t, dim=-1) for t in (q, k))
    exact = torch.exp(-torch.cdist(qn[0, 0], kn[0, 0]) ** 2 / 2)
    torch.testing.assert_close((phi(q) @ phi(k).transpose(-1, -2))[0, 0], exact, rtol=0.1, atol=0.05)


def test_hedgehog_has_both_signs_and_sums_to_two():
    phi = build_feature_map("hedgehog", num_heads=2, head_dim=8, feature_dim=4)
    out = phi(torch.randn(1, 2, 3, 8))
    torch.testing.assert_close(out.sum(-1), torch.full((1, 2, 3), 2.0))


@pytest.mark.parametrize("bad", [0, -3])
def test_nonpositive_feature_dim_is_rejected(bad):
    with pytest.raises(ValueError, match="must be positive"):
        build_feature_map("t2r", 2, 8, bad)


def test_unknown_feature_map_is_rejected():
    with pytest.raises(ValueError, match="unknown --t2r-feature-map 'cosine'"):
        build_feature_map("cosine", 2, 8, 4)
