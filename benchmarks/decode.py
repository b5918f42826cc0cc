"""Decoding: time per step and memory of softmax (kv cache), T2R (recurrent state) and the floor,
through fairseq's own incremental decoding (model.decoder(tokens, incremental_state=...)), and
end-to-end fairseq SequenceGenerator runs.

Per (prefix length L, batch B): the prefix is read once at batch 1 (`models.prefill`) and copied to
B rows with the decoder's own reorder_incremental_state (what beam search does); then single-token
steps are timed. Key/value caches are put back to length L before every step (outside the timer),
so each step attends over exactly L keys; T2R's state is constant-size and simply keeps going.
Models take turns step by step (A B C, B C A, ...), so that changes in machine load hit all three
alike; each gets as many steps as fit in `seconds` (within min_steps..max_steps).
"""
import torch

from .measure import medians, peak_bytes, timed
from .models import prefill, state_bytes

MODELS = ("softmax", "t2r", "floor")


def _copy_state(state):
    """New dict structure sharing the tensors: enough to undo a softmax step, whose cache update
    replaces tensors (torch.cat) instead of writing into them."""
    return {key: dict(buf) for key, buf in state.items()}


def _expand(model, state, batch):
    """State for `batch` identical rows, in new tensors (index_select), leaving `state` intact."""
    state = _copy_state(state)
    model.decoder.reorder_incremental_state_scripting(state, torch.zeros(batch, dtype=torch.long))
    return state


def decode_rows(models, lengths, batches, *, vocab, seconds=3.0, min_steps=6, max_steps=200, seed=0, log=print):
    """One row per (L, B, model): median seconds per step, state bytes, peak bytes during a step."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    for length in lengths:
        tokens = torch.randint(4, vocab, (1, length + 1), generator=g)
        with torch.no_grad():
            prefix_states = {name: prefill(model, tokens[:, :length]) for name, model in models.items()}
        for batch in batches:
            step_tokens = tokens.expand(batch, -1).contiguous()
            runs = {}
            for name, model in models.items():
                state, prefix = {}, prefix_states[name]

                def step(model=model, state=state):
                    model.decoder(step_tokens, incremental_state=state)

                def expand_and_step(model=model, state=state, prefix=prefix):
                    state.update(_expand(model, prefix, batch))
                    step()

                with torch.no_grad():
                    # The state is built inside the profiled call: the profiler only sees the free
                    # of a block it saw allocated (softmax frees its old cache during a step).
                    # Its peak is the state plus the first step's transients; warms up too.
                    peak = peak_bytes(expand_and_step)
                    state.clear()
                    state.update(_expand(model, prefix, batch))  # a softmax cache of exactly L keys again
                    held = state_bytes(state)
                    # Put back before every step: undoes a key/value cache's growth (softmax or a
                    # hybrid's softmax layers); T2R's in-place state just keeps going.
                    restore = _copy_state(state)
                    first = timed(step)[0]
                runs[name] = dict(step=step, state=state, restore=restore, held=held, peak=peak, times=[],
                                  steps=max(min_steps, min(max_steps, int(seconds / first))))
            with torch.no_grad():
                for i in range(max(run["steps"] for run in runs.values())):
                    names = list(models)[i % len(models):] + list(models)[:i % len(models)]
                    for name in names:
                        run = runs[name]
                        if i >= run["steps"]:
                            continue
                        run["state"].clear()
                        run["state"].update(_copy_state(run["restore"]))
                        run["times"].append(timed(run["step"]))
            for name, run in runs.items():
                wall, cpu = medians(run["times"])
                rows.append(dict(length=length, batch=batch, model=name, step_s=cpu, wall_s=wall,
                                 steps=len(run["times"]), state_bytes=run["held"], peak_bytes=run["peak"]))
            log(f"  L={length:5d} B={batch:2d}  " + "  ".join(
                f"{r['model']} {r['step_s'] * 1e3:8.2f} ms (wall {r['wall_s'] * 1e3:.2f})" for r in rows[-len(models):]))
            del runs
        del prefix_states
    return rows


def constant_cost_rows(model, lengths, batches, *, vocab, seconds=3.0, seed=0, log=print):
    """T2R alone, one state per prefix length, stepped in turn (L1 L2 ... L1 L2 ...): whether a step
    costs the same after any prefix, without the drift of machine load between the
    configurations that decode_rows measures minutes apart."""
    rows = []
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (1, max(lengths) + 1), generator=g)
    with torch.no_grad():
        prefix_states = {n: prefill(model, tokens[:, :n]) for n in lengths}
        for batch in batches:
            step_tokens = {n: tokens[:, :n + 1].expand(batch, -1).contiguous() for n in lengths}
            states = {n: _expand(model, prefix_states[n], batch) for n in lengths}
            for n in lengths:  # warm-up
                model.decoder(step_tokens[n], incremental_state=states[n])
            first = timed(lambda: model.decoder(step_tokens[lengths[0]], incremental_state=states[lengths[0]]))[0]
            times = {n: [] for n in lengths}
            for _ in range(max(6, int(seconds / first))):
                for n in lengths:
                    times[n].append(timed(lambda: model.decoder(step_tokens[n], incremental_state=states[n])))
            for n in lengths:
                wall, cpu = medians(times[n])
                rows.append(dict(length=n, batch=batch, step_s=cpu, wall_s=wall))
            log(f"  t2r B={batch:2d}  " + "  ".join(f"L={r['length']} {r['step_s'] * 1e3:.2f} ms"
                                                   for r in rows[-len(lengths):]))
    return rows


def sequence_generation(model, *, length, beam=1):
    """A call that has fairseq's SequenceGenerator produce exactly `length` tokens (min_len = max_len)
    from a one-token prompt, batch 1, and returns the best hypothesis's tokens (with the final eos)."""
    from fairseq.sequence_generator import SequenceGenerator

    dictionary = model.decoder.dictionary
    sample = {"net_input": {"src_tokens": torch.tensor([[dictionary.eos()]]), "src_lengths": torch.tensor([1])}}
    generator = SequenceGenerator([model], dictionary, beam_size=beam, max_len_a=0, max_len_b=length, min_len=length)

    def generate():
        with torch.no_grad():
            return generator.generate([model], sample)[0][0]["tokens"]

    return generate


def generation_rows(models, *, length, beams, vocab, log=print):
    """sequence_generation for every model and beam size; CPU and wall time of one run after a warm-up."""
    rows = []
    for beam in beams:
        for name, model in models.items():
            generate = sequence_generation(model, length=length, beam=beam)
            sequence_generation(model, length=8, beam=beam)()  # warm-up
            tokens = []
            wall, cpu = timed(lambda: tokens.append(generate()))
            produced = tokens[0].numel()
            rows.append(dict(model=name, beam=beam, length=produced, seconds=cpu, wall=wall))
            log(f"  beam={beam} {name}: {produced} tokens in {cpu:.2f} s CPU ({wall:.2f} s wall)")
    return rows
