"""Numerical agreement of the timed models, checked before any timing counts: a fast form that computes
something else would make every ratio meaningless. (The attention math alone: tests/test_linear_attention.py.)"""
import torch

from .models import one_chunk, prefill, t2r_twin


def _diff(*pairs):
    return max((a.double() - b.double()).abs().max().item() for a, b in pairs)


def run_checks(models, *, vocab, prefix=96, steps=8, seed=0, log=print):
    """[(what, max |difference|, tolerance)], logged; stops the run (SystemExit) if one is out of tolerance."""
    results, g = [], torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (2, prefix + steps), generator=g)
    t2r, plain = models["t2r"], t2r_twin(models["t2r"], fold_feature_map=False)  # the textbook form, same weights
    with torch.no_grad():
        for name, model in models.items():  # prefill + single-token steps (the path timed) vs one full forward
            state = prefill(model, tokens[:, :prefix])
            steps_out = torch.cat([model.decoder(tokens[:, :t + 1], incremental_state=state)[0]
                                   for t in range(prefix, prefix + steps)], dim=1)
            results.append((f"{name}: prefill + {steps} incremental steps vs full forward (logits)",
                            _diff((steps_out, model.decoder(tokens)[0][:, prefix:])), 1e-3))
        results.append(("t2r: feature map folded into one q/k/v matmul vs unfolded (logits)",
                        _diff((t2r.decoder(tokens)[0], plain.decoder(tokens)[0])), 1e-3))
    # Training: chunked vs one chunk (the T x T form) on a layer, outputs and input gradients.
    x = torch.randn(300, 2, t2r.decoder.embed_dim, generator=g)
    for name in ("t2r", "t2r_window", "t2r_gated_delta"):
        grads = []
        for model in (models[name], one_chunk(models[name], 300)):
            xi = x.clone().requires_grad_()
            out = model.decoder.layers[0](xi)[0]
            out.backward(torch.ones_like(out))
            grads.append((out.detach(), xi.grad))
        results.append((f"{name} layer: chunked vs naive, outputs and input gradients (float32)",
                        _diff(*zip(*grads)), 1e-3))

    for what, diff, tol in results:
        log(f"  check {'ok ' if diff <= tol else 'BAD'} {diff:.1e} (tol {tol:.0e})  {what}")
    if any(not diff <= tol for _, diff, tol in results):
        raise SystemExit("numerical checks failed (BAD above): timings would be meaningless")
    return results
