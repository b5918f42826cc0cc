"""The fused T2R projection (feature map folded into q/k_proj, q/k/v in one matmul) and the packed
decode step compute what the textbook forms compute: values, gradients, decode steps, and after
weight changes between decoding runs."""
import copy

import torch

from helpers import TINY_LM, build_model
from t2r_fairseq import linear_attention as la
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


def _decode(module, x, prefix):
    """Prefix in one call, then one call per position, as generation with a prompt does."""
    state = {}
    steps = [module(x[:prefix], x[:prefix], x[:prefix], incremental_state=state)[0]]
    steps += [module(x[t:t + 1], x[t:t + 1], x[t:t + 1], incremental_state=state)[0] for t in range(prefix, len(x))]
    return torch.cat(steps)


def test_packed_step_equals_step():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.rand(2, 3, 1, 5, generator=g, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, 1, 4, generator=g, dtype=torch.float64)
    state = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64),
             torch.rand(2, 3, 5, generator=g, dtype=torch.float64))
    out, (s, z) = la.linear_attention_step(q, k, v, state)
    packed = la.pack_state(state)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)
    for inplace in (False, True):
        out_p, new = la.packed_linear_attention_step(q, k, v1, packed.clone(), inplace=inplace)
        torch.testing.assert_close(out_p, out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(la.unpack_state(new)[0], s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(la.unpack_state(new)[1], z, rtol=1e-12, atol=1e-12)


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
        full = plain(x, x, x)[0]
        torch.testing.assert_close(fused(x, x, x)[0], full, rtol=1e-10, atol=1e-10)
        for prefix in (1, 12):
            torch.testing.assert_close(_decode(fused, x, prefix), full, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(_decode(plain, x, prefix), full, rtol=1e-10, atol=1e-10)


def test_new_decoding_run_sees_changed_weights():
    # fairseq's optimizers write through .data, which no version counter sees: the fold must
    # come from the weights as they are when a run starts.
    fused, plain = _pair()
    x = _x(time=6)
    with torch.no_grad():
        _decode(fused, x, 2)
        for module in (fused, plain):
            module.feature_map.weight.data.mul_(1.5)
            module.q_proj.bias.data.add_(0.3)
            module.v_proj.weight.data.mul_(0.5)
        torch.testing.assert_close(_decode(fused, x, 2), plain(x, x, x)[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(fused(x, x, x)[0], plain(x, x, x)[0], rtol=1e-10, atol=1e-10)


def test_whole_model_equal_with_and_without_folding():
    model, _ = build_model("t2r_lm", TINY_LM)
    plain = copy.deepcopy(model)
    for layer in plain.decoder.layers:
        layer.self_attn.fold_feature_map = False
    tokens = torch.randint(4, 60, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model.decoder(tokens)[0], plain.decoder(tokens)[0], rtol=1e-5, atol=1e-5)
