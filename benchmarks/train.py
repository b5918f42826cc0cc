"""Training: forward + backward per token at a fixed number of tokens per step (batch = tokens // length), for
one decoder layer and for the whole model (output layer and loss). Forms: softmax (fairseq's, causal mask), t2r
(chunked), t2r-naive (one chunk as long as the sequence: the T x T form), for one layer the variants. Time: median
process CPU time of one torch thread, the forms taking turns; memory: peak torch tensor bytes (torch.profiler)."""
import statistics

import torch

from .measure import peak_bytes, row_line, timed
from .models import t2r_twin


def _iteration(model, level, batch, length, vocab, g):
    """One forward + backward of one layer or of the whole model (with the loss); inputs made outside the timer."""
    x = torch.randn(length, batch, model.decoder.embed_dim, generator=g, requires_grad=True)
    grad, mask = torch.randn(x.shape, generator=g), model.decoder.buffered_future_mask(x)  # mask: None for T2R
    tokens = torch.randint(4, vocab, (batch, length + 1), generator=g)

    def iteration():
        model.zero_grad(set_to_none=True)
        if level == "layer":
            model.decoder.layers[0](x, self_attn_mask=mask)[0].backward(grad)
        else:
            logits = model.decoder(tokens[:, :-1])[0]
            torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), tokens[:, 1:].reshape(-1)).backward()
    return iteration


def train_rows(models, lengths, *, tokens, level, naive_max_length, rounds=2, vocab, seed=0, log=print):
    """One row per (length, form): median CPU seconds and peak bytes of one iteration, per token."""
    rows, g = [], torch.Generator().manual_seed(seed)
    # A chunk is never longer than the sequence, so up to naive_max_length each runs in one chunk.
    forms = {"softmax": models["softmax"], "t2r": models["t2r"],
             "t2r-naive": t2r_twin(models["t2r"], chunk_size=naive_max_length),
             **{name: model for name, model in models.items() if name.startswith("t2r_")}}
    for length in lengths:
        batch, runs = max(1, tokens // length), {}
        for form, model in forms.items():
            if form != "t2r-naive" or length <= naive_max_length:
                iteration = _iteration(model.train(), level, batch, length, vocab, g)
                runs[form] = iteration, peak_bytes(iteration), []  # the profiled one warms up too
        for _ in range(rounds):
            for iteration, _, times in runs.values():
                times.append(timed(iteration)[1])
        for form, (_, peak, times) in runs.items():
            n = batch * length
            rows.append(dict(level=level, length=length, batch=batch, form=form,
                             token_s=statistics.median(times) / n, token_bytes=peak / n))
            log(row_line(rows[-1]))
    for model in forms.values():
        model.eval()
    return rows
