"""The reports: markdown per benchmark and its rows as JSON beside it; a table: columns (head, cell(item)), items."""
import json

from tools import kit

from . import decode as decode_module
from . import generation_memory
from . import train as train_module
from .measure import human_bytes
from .models import DECAY_MODELS

TIME_NOTE = "Times are process CPU time of one torch thread (the work itself), the median over forms taking turns."
DECAY_FLOOR = {"t2r_fixed": 1.05, "t2r_learned": 1.05, "t2r_gated": 1.15}  # target: decode step / floor's
FLAT = 1.10  # target: decode step after the longest prefix / after the shortest
TRAIN_FORMS = ("softmax", "t2r", "t2r-naive") + DECAY_MODELS
LABELS = {"softmax": "softmax", "t2r": "T2R", "floor": "floor"}
ms, us, kib = (lambda v: f"{v * 1e3:.2f}"), (lambda v: f"{v * 1e6:.1f}"), (lambda v: f"{v / 1024:.1f}")
two = "{:.2f}".format


def field(name, fmt=str):
    return lambda x: fmt(x[name])


def at(model, name, fmt):
    """The cell of item[model][name], or "skipped" where that model has no row."""
    return lambda x: fmt(x[model][name]) if x.get(model) else "skipped"


def over(a, b, name="step_s", fmt=two):
    return lambda x: fmt(x[a][name] / x[b][name])


def ratio(a, b, name="step_s"):
    return a[name] / b[name] if a and b else None


def by(rows, *keys):
    return {tuple(r[k] for k in keys): r for r in rows}


def table(columns, items, title=None, note=None):
    """Markdown lines under an optional `## title` and note, and a blank line after the table."""
    return ([f"## {title}", ""] if title else []) + ([note, ""] if note else []) + [
        "| " + " | ".join(head for head, _ in columns) + " |", "|" + "---|" * len(columns),
        *("| " + " | ".join(str(cell(x)) for _, cell in columns) + " |" for x in items), ""]


def targets(goals, title="Targets", fmt="{:.2f}x".format):
    """goals: (what, measured value or None, test of the value)."""
    return table([("target", field(0)), ("measured", lambda g: "not measured" if g[1] is None else fmt(g[1])),
                  ("", lambda g: "-" if g[1] is None else "met" if g[2](g[1]) else "MISSED")], goals, title)


def checks_table(checks):
    return table([("check", field(0)), ("max abs difference", field(1, "{:.1e}".format)),
                  ("tolerance", field(2, "{:.0e}".format))], checks,
                 "Numerical checks (run before timing; the run stops if one fails)")


def write(out, name, header, title, module, lines, **rows):
    """<name>.md (title, machine, the method: `module`'s docstring, `lines`) and <name>.json (header, rows)."""
    end = kit.load_average()
    top = [f"# {title}", "", f"Command: `{header['command']}` ({header['date']})", "",
           f"Machine: {header['machine']}; 1-minute load average at the start {header['load_start']:.2f}, "
           f"at the end {end:.2f}", ""]
    if header["warning"]:
        top += ["**Measured under load: " + header["warning"].splitlines()[1] + "**", ""]
    note = (TIME_NOTE + " " if module is not generation_memory else "") + " ".join(module.__doc__.split())
    (out / f"{name}.md").write_text("\n".join(top + [f"Models: {header['shape']}", "", note, ""] + lines))
    (out / f"{name}.json").write_text(json.dumps({"header": {**header, "load_end": end}, **rows}, indent=1) + "\n")


def write_decode(out, header, checks, decode, constant, decay, generate):
    lines, t, c, d = checks_table(checks), by(decode, "length", "batch", "model"), by(constant, "length", "batch"), \
        by(decay, "length", "batch", "model")
    lengths, batches = sorted({n for n, _, _ in t}), sorted({b for _, b, _ in t})
    grid = [dict(batch=b, length=n, first=t[(lengths[0], b, "t2r")], **{m: t[(n, b, m)] for m in LABELS})
            for b in batches for n in lengths]
    wall = lambda x: " / ".join(f"{x[m]['wall_s'] * 1e3:.1f}" for m in LABELS)  # noqa: E731
    lines += table([("batch", field("batch")), ("prefix L", field("length")),
                    *((f"{label} ms", at(m, "step_s", ms)) for m, label in LABELS.items()),
                    ("softmax / T2R", over("softmax", "t2r")), ("T2R / floor", over("t2r", "floor")),
                    ("T2R(L) / T2R(shortest)", over("t2r", "first")), ("wall ms: softmax / T2R / floor", wall)],
                   grid, "Time per decode step", "*floor*: the same model without attention mixing (projections, "
                   "FFN and output layer kept): no attention variant can beat it. T2R(L) / T2R(shortest) would be "
                   "1.00 without noise.") if decode else []
    cl = sorted({n for n, _ in c})
    lines += table([("batch", field("batch")), *((f"L={n} ms", at(f"L={n}", "step_s", ms)) for n in cl),
                    ("longest / shortest", over(f"L={cl[-1]}", f"L={cl[0]}"))],
                   [dict(batch=b, **{f"L={n}": c[(n, b)] for n in cl}) for b in batches],
                   "T2R after every prefix length, side by side", "The T2R model alone, one state per prefix "
                   "length, taking turns: only the prefix length differs.") if constant else []
    lines += table([("batch", field("batch")), ("prefix L", field("length")),
                    ("softmax kv cache held", at("softmax", "state_bytes", human_bytes)),
                    ("T2R state held", at("t2r", "state_bytes", human_bytes)),
                    ("cache / state", over("softmax", "t2r", "state_bytes", "{:.0f}".format)),
                    *((f"{label} peak in a step", at(m, "peak_bytes", human_bytes)) for m, label in LABELS.items())],
                   grid, "Memory of decoding", "Torch tensor bytes. *held*: the incremental state (softmax: the kv "
                   "cache; T2R: [S | z], without its folded projection weights, shared by all sequences). *peak*: "
                   "allocations minus frees (torch.profiler) while copying the prefix state to the batch and taking "
                   "one step.") if decode else []
    if decay:
        short, long = min(n for n, _, _ in d), max(n for n, _, _ in d)
        items = [dict(batch=b, model=m, s=d[(short, b, m)], n=d[(long, b, m)], fs=d[(short, b, "floor")],
                      fn=d[(long, b, "floor")]) for b in batches for m in dict.fromkeys(m for _, _, m in d)]
        lines += table([("batch", field("batch")), ("model", field("model")),
                        (f"L={short} ms", at("s", "step_s", ms)), (f"L={long} ms", at("n", "step_s", ms)),
                        (f"/ floor at L={short}", over("s", "fs")), (f"/ floor at L={long}", over("n", "fn")),
                        ("longest / shortest", over("n", "s"))], items,
                       "Decay of the state (--t2r-decay): time per decode step", "T2R with each decay (same weights), "
                       "plain T2R and the floor, all taking turns at the shortest and the longest prefix.")
    goals = []
    for b in batches if decode else ():
        worst, n = max((ratio(t[(n, b, "t2r")], t[(n, b, "floor")]), n) for n in lengths)
        goals += [(f"T2R step at prefix 8192 within {FLAT:.2f}x of prefix 128, batch {b} (side by side)",
                   ratio(c.get((8192, b)), c.get((128, b))), lambda x: x <= FLAT),
                  (f"T2R within 1.15x of the floor at every length, batch {b} (worst: L={n})", worst,
                   lambda x: x <= 1.15)]
    goals += [(f"T2R >= {goal}x faster than softmax at prefix {n}, batch {b}",
               ratio(t.get((n, b, "softmax")), t.get((n, b, "t2r"))), lambda x, goal=goal: x >= goal)
              for n, b, goal in ((4096, 1, 4), (2048, 16, 10))] if decode else []
    for m, limit in DECAY_FLOOR.items() if decay else ():
        mine = [x for x in items if x["model"] == m]
        goals += [(f"{m} within {limit:.2f}x of the floor at prefix {short} and {long}, every batch (worst)",
                   max(ratio(x[k], x["f" + k]) for x in mine for k in "sn"), lambda x, limit=limit: x <= limit),
                  (f"{m} step at prefix {long} within {FLAT:.2f}x of prefix {short}, every batch (worst)",
                   max(ratio(x["n"], x["s"]) for x in mine), lambda x: x <= FLAT)]
    if decode:
        lines += ["![decode step time](bench_decode.png)", ""] + targets(goals)
        _plot(out / "bench_decode.png", t, lengths, batches)
    g = by(generate, "model", "beam")
    lines += table([("beam", field("beam")), ("tokens", lambda x: x["t2r"]["length"]),
                    ("softmax s", at("softmax", "seconds", two)), ("T2R s", at("t2r", "seconds", two)),
                    ("softmax / T2R", over("softmax", "t2r", "seconds")),
                    ("T2R tokens/s", lambda x: f"{x['t2r']['length'] / x['t2r']['seconds']:.0f}")],
                   [dict(beam=beam, softmax=g[("softmax", beam)], t2r=g[("t2r", beam)]) for beam in
                    sorted({beam for _, beam in g})], "End to end: fairseq SequenceGenerator", "Batch 1, one-token "
                   "prompt, exactly the given number of tokens (min_len = max_len), beam search reordering the "
                   "state; one run after a warm-up.") if generate else []
    write(out, "bench_decode", header, "Decoding: softmax (kv cache) vs T2R (recurrent state) vs floor", decode_module,
          lines, decode=decode, constant=constant, decay=decay, generate=generate)


def _plot(path, t, lengths, batches):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        for m, style in (("softmax", "o-"), ("t2r", "s-"), ("floor", "^--")):
            ax.loglog(lengths, [t[(n, b, m)]["step_s"] * 1e3 for n in lengths], style, label=m)
        ax.set(xlabel="prefix length", ylabel="ms per decode step (CPU time)", title=f"batch {b}")
        ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_train(out, header, checks, train):
    lines, t = checks_table(checks), by(train, "level", "length", "form")
    for level in ("layer", "model"):
        items = [dict(length=n, batch=t[(level, n, "t2r")]["batch"], **{f: t.get((level, n, f)) for f in TRAIN_FORMS})
                 for n in sorted({n for lv, n, _ in t if lv == level})]
        tables = [(TRAIN_FORMS[:3], ("softmax",), level),
                  (("t2r",) + DECAY_MODELS, DECAY_MODELS, f"{level}: decay of the state (--t2r-decay)")]
        for forms, over_t2r, title in tables:
            if any(x[forms[1]] for x in items):  # measured at this level
                lines += table([("length", field("length")), ("batch", field("batch")),
                                *((f"{f} us/token", at(f, "token_s", us)) for f in forms),
                                *((f"{m} / t2r", over(m, "t2r", "token_s")) for m in over_t2r),
                                *((f"{f} KiB/token", at(f, "token_bytes", kib)) for f in forms)], items, title)
    goals = [goal for level in ("layer", "model") for goal in (
        (f"chunked T2R >= 2x faster than softmax at 4096 ({level}; softmax / t2r)",
         ratio(t.get((level, 4096, "softmax")), t.get((level, 4096, "t2r")), "token_s"), lambda x: x >= 2),
        (f"chunked T2R <= 1.3x slower than softmax at 512 ({level}; t2r / softmax)",
         ratio(t.get((level, 512, "t2r")), t.get((level, 512, "softmax")), "token_s"), lambda x: x <= 1.3))]
    goals += [(f"chunked {m} within 1.3x of plain chunked T2R at 4096 (layer; {m} / t2r)",
               ratio(t.get(("layer", 4096, m)), t.get(("layer", 4096, "t2r")), "token_s"), lambda x: x <= 1.3)
              for m in DECAY_MODELS]
    write(out, "bench_train", header, "Training: forward + backward per token, T2R chunked vs softmax vs quadratic T2R",
          train_module, lines + targets(goals), train=train)


def write_memory(out, header, memory):
    t = by(memory, "model", "length")
    short, long = min(n for _, n in t), max(n for _, n in t)
    lines = table([("model", field("model")), ("tokens generated", field("length")),
                   ("RSS before generating (baseline)", field("baseline_bytes", human_bytes)),
                   ("peak RSS while generating", field("peak_bytes", human_bytes)),
                   ("increment (peak - baseline)", field("increment_bytes", human_bytes)),
                   ("CPU s", field("seconds", "{:.1f}".format))], memory)
    # An increment can be 0 (or a page negative): the generation then fit in pages already resident.
    lines += table([("model", field("model")),
                    (f"peak({long}) / peak({short})", over("n", "s", "peak_bytes", "{:.3f}".format)),
                    (f"increment({long}) / increment({short})", lambda x: two(ratio(x["n"], x["s"], "increment_bytes"))
                     if x["s"]["increment_bytes"] > 0 else "-"),
                    (f"increment({long}) - increment({short})",
                     lambda x: human_bytes(x["n"]["increment_bytes"] - x["s"]["increment_bytes"]))],
                   [dict(model=m, s=t[(m, short)], n=t[(m, long)]) for m in dict.fromkeys(m for m, _ in t)],
                   f"{long} tokens vs {short}", "The baseline (Python, torch, fairseq, the weights) dominates the "
                   "peak; the increments are what generation adds.")
    lines += targets([(f"T2R peak RSS generating {long} tokens grows < 5% over generating {short}",
                       ratio(t[("t2r", long)], t[("t2r", short)], "peak_bytes"), lambda x: x < 1.05)],
                     "Target", "{:.3f}x".format)
    write(out, "generation_memory", header, "Generation memory: T2R (constant-size state) vs softmax (key/value cache)",
          generation_memory, lines, memory=memory)
