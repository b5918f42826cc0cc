"""Training: forward + backward time and peak memory per token, at a fixed number of tokens per
step (batch = tokens // length), for one decoder layer and for the whole model (with its output
layer and cross-entropy loss).

Forms: `softmax` (fairseq's MultiheadAttention as the decoder layer uses it, causal mask and all),
`t2r` (the chunked parallel form) and `t2r-naive` (the same weights, built with one chunk as long as the
sequence, i.e. the quadratic form that materializes the T x T kernel matrix).
"""
import torch

from .measure import medians, peak_bytes, timed
from .models import t2r_twin

FORMS = ("softmax", "t2r", "t2r-naive")


def _iteration(model, level, batch, length, vocab, g):
    """A closure running one forward + backward; inputs are made once, outside the timer."""
    params = list(model.parameters())
    if level == "layer":
        layer = model.decoder.layers[0]
        dim = model.decoder.embed_dim
        x = torch.randn(length, batch, dim, generator=g, requires_grad=True)
        grad = torch.randn(length, batch, dim, generator=g)
        mask = model.decoder.buffered_future_mask(x)  # None for T2R decoders: causal by construction

        def run():
            out = layer(x, self_attn_mask=mask)[0]
            out.backward(grad)
    else:
        tokens = torch.randint(4, vocab, (batch, length + 1), generator=g)

        def run():
            logits = model.decoder(tokens[:, :-1])[0]
            loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tokens[:, 1:].reshape(-1))
            loss.backward()

    def iteration():
        for p in params:
            p.grad = None
        run()
    return iteration


def train_rows(models, lengths, *, tokens, levels=("layer", "model"), naive_max_length=4096, rounds=2,
               vocab, seed=0, log=print):
    """One row per (level, length, form): median seconds and peak bytes of one iteration, per token."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    # The naive form: the T2R model built with chunks as long as any sequence it runs (a chunk is
    # never longer than the sequence, so each runs in one chunk: the T x T form).
    forms = {"softmax": models["softmax"], "t2r": models["t2r"],
             "t2r-naive": t2r_twin(models["t2r"], chunk_size=naive_max_length)}
    for model in forms.values():
        model.train()
    try:
        for level in levels:
            for length in lengths:
                batch = max(1, tokens // length)
                runs = {}
                for form, model in forms.items():
                    if form == "t2r-naive" and length > naive_max_length:
                        continue
                    iteration = _iteration(model, level, batch, length, vocab, g)
                    # The profiled first iteration is also the warm-up.
                    runs[form] = dict(iteration=iteration, peak=peak_bytes(iteration), times=[])
                for r in range(rounds):
                    for run in runs.values():
                        run["times"].append(timed(run["iteration"]))
                n = batch * length
                for form, run in runs.items():
                    wall, cpu = medians(run["times"])
                    rows.append(dict(level=level, length=length, batch=batch, form=form, token_s=cpu / n,
                                     token_wall_s=wall / n, token_bytes=run["peak"] / n))
                log(f"  {level:5s} L={length:5d} B={batch:2d}  " + "  ".join(
                    f"{r['form']} {r['token_s'] * 1e6:7.1f} us/tok" for r in rows[-len(runs):]))
    finally:
        for model in forms.values():
            model.eval()
    return rows
