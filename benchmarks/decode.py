"""Time and memory of one decode step through fairseq's incremental decoding. Per (prefix length L,
batch B): the prefix is read once (`models.prefill`) and copied to B rows by the decoder's own
reorder_incremental_state (as beam search does); then single-token steps are timed, the models (and in
side-by-side groups the lengths) taking turns (A B C, B C A, ...) so that changes in machine load hit
all alike. A kv cache is put back to L keys before every step; a recurrent state simply keeps going.
Times: the median process CPU time of one torch thread (the work itself)."""
import functools
import statistics

import torch

from .measure import peak_bytes, row_line, timed
from .models import prefill, state_bytes


def _expand(model, state, batch):
    """State for `batch` identical rows, in new tensors (index_select), leaving `state` intact."""
    state = {key: dict(buf) for key, buf in state.items()}
    model.decoder.reorder_incremental_state_scripting(state, torch.zeros(batch, dtype=torch.long))
    return state


def _put_back(state, saved):
    """state := new dicts sharing saved's tensors: undoes a softmax step, whose cache update replaces tensors
    (torch.cat) instead of writing into them; a recurrent state, updated in place, keeps going."""
    state.clear()
    state.update({key: dict(buf) for key, buf in saved.items()})


def _in_turns(runs, batch, seconds, min_steps=6, max_steps=200):
    """runs {key: (model, prefix state, tokens (1, L + 1))} -> {key: row}: decode steps at `batch` taking turns."""
    turns, rows = [], {}
    for key, (model, prefix, tokens) in runs.items():
        state = {}
        step = functools.partial(model.decoder, tokens.expand(batch, -1).contiguous(), incremental_state=state)
        # The state is built inside the profiled call (the profiler only counts the free of a block it saw
        # allocated, and softmax frees its old cache in a step); this warms up too.
        peak = peak_bytes(lambda: (state.update(_expand(model, prefix, batch)), step()))
        saved = _expand(model, prefix, batch)  # a softmax cache of exactly L keys
        put_back = functools.partial(_put_back, state, saved)
        put_back()
        turns.append((key, put_back, step, max(min_steps, min(max_steps, int(seconds / timed(step)[0])))))
        rows[key] = dict(state_bytes=state_bytes(saved), peak_bytes=peak, times=[])
    for i in range(max(count for *_, count in turns)):
        for key, put_back, step, count in turns[i % len(turns):] + turns[:i % len(turns)]:  # A B C, B C A, ...
            if i < count:
                put_back()
                rows[key]["times"].append(timed(step))
    for row in rows.values():
        walls, cpus = zip(*row.pop("times"))
        row.update(step_s=statistics.median(cpus), wall_s=statistics.median(walls))
    return rows


def decode_rows(models, lengths, batches, *, vocab, side_by_side=False, seconds=3.0, seed=0, log=print):
    """One row per (L, B, model), the models taking turns at each L; side_by_side: every (model, L) with
    every other, so that cost(L) / cost(shortest) is free of the drift of machine load between lengths."""
    tokens = torch.randint(4, vocab, (1, max(lengths) + 1), generator=torch.Generator().manual_seed(seed))
    pairs = [[(m, n) for m in models] for n in lengths]
    groups = [sum(pairs, [])] if side_by_side else pairs
    rows = []
    with torch.no_grad():
        for group in groups:
            runs = {(m, n): (models[m], prefill(models[m], tokens[:, :n]), tokens[:, :n + 1]) for m, n in group}
            for batch in batches:
                for (m, n), row in _in_turns(runs, batch, seconds).items():
                    rows.append(dict(length=n, batch=batch, model=m, **row))
                    log(row_line(rows[-1]))
            del runs  # before the next prefill: long caches are large
    return rows
