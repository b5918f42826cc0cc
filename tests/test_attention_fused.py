"""The fused T2R projection (feature map folded into q/k_proj, q/k/v in one matmul) computes what
the textbook form (projections, then feature map) computes: values, gradients, decode steps, and
after every kind of weight change that must invalidate its inference cache."""
import copy

import torch

from helpers import TINY_LM, build_model
from t2r_fairseq.attention import T2RAttention


def _pair(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    fused = T2RAttention(16, 2, feature_dim=4).to(dtype)
    with torch.no_grad():  # non-zero biases, so the folded bias is exercised too
        for p in fused.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    plain = copy.deepcopy(fused)
    plain.fold_feature_map = False
    return fused, plain


def _x(time=70, batch=3, dim=16, seed=1, dtype=torch.float64):
    return torch.randn(time, batch, dim, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_training_forward_and_gradients_equal():
    fused, plain = _pair()
    x = _x()
    grads = []
    for module in (fused, plain):
        xi = x.clone().requires_grad_()
        out, _ = module(xi, xi, xi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append([out.detach(), xi.grad] + [p.grad for p in module.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_inference_full_and_incremental_equal():
    fused, plain = _pair()
    x = _x(time=20)
    with torch.no_grad():
        torch.testing.assert_close(fused(x, x, x)[0], plain(x, x, x)[0], rtol=1e-10, atol=1e-10)
        outs = {}
        for name, module in (("fused", fused), ("plain", plain)):
            state = {}
            outs[name] = torch.cat([module(x[:12], x[:12], x[:12], incremental_state=state)[0]]
                                   + [module(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0]
                                      for t in range(12, 20)])
    torch.testing.assert_close(outs["fused"], outs["plain"], rtol=1e-10, atol=1e-10)


def test_inference_cache_follows_weight_changes():
    fused, plain = _pair()
    x = _x(time=5)

    def agree():
        with torch.no_grad():
            torch.testing.assert_close(fused(x, x, x)[0], plain(x, x, x)[0], rtol=1e-10, atol=1e-10)

    agree()  # builds the cache
    for module in (fused, plain):  # an optimizer step: in-place update
        with torch.no_grad():
            module.feature_map.weight.mul_(1.5)
            module.q_proj.bias.add_(0.3)
    agree()
    new = _pair(seed=5)[0].state_dict()
    fused.load_state_dict(new)
    plain.load_state_dict(new)
    agree()
    fused.float(), plain.float()  # a dtype round trip reallocates every parameter
    fused.double(), plain.double()
    agree()


def test_whole_model_equal_with_and_without_folding():
    model, _ = build_model("t2r_lm", TINY_LM)
    plain = copy.deepcopy(model)
    for layer in plain.decoder.layers:
        layer.self_attn.fold_feature_map = False
    tokens = torch.randint(4, 60, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(tokens)[0], plain.decoder(tokens)[0], rtol=1e-5, atol=1e-5)
