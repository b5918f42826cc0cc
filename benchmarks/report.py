"""The reports: a markdown file per benchmark (tables, targets, the decode plot) and the rows
behind it as JSON beside it, which tools.readme builds the README's tables from."""
import json

from tools import kit

from . import decode as decode_module
from . import generation_memory
from . import train as train_module
from .measure import human_bytes

TIME_NOTE = ("Times are process CPU time of one torch thread, the median over forms taking turns: with one thread "
             "CPU time is the work itself, while wall time (given beside it) adds the waits for a core.")


def table(head, rows, title=None, note=None):
    """Markdown lines of a table under an optional `## title` and note, and a blank line after it."""
    return ([f"## {title}", ""] if title else []) + ([note, ""] if note else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
        *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows), ""]


def targets(rows, title="Targets", fmt="{:.2f}x"):
    """rows of (what, measured value or None, test of the value): the targets table."""
    return table(["target", "measured", ""], [[text, "not measured", "-"] if value is None else
                                              [text, fmt.format(value), "met" if test(value) else "MISSED"]
                                              for text, value, test in rows], title)


def ratio(a, b, key):
    return a[key] / b[key] if a and b else None


def write(out, name, header, title, note, lines, **rows):
    """<name>.md (title, how and where it was measured, a note on the method, `lines`) and <name>.json
    (the header and the rows)."""
    end = kit.load_average()
    top = [f"# {title}", "", f"Command: `{header['command']}` ({header['date']})", "",
           f"Machine: {header['machine']}; 1-minute load average at the start {header['load_start']:.2f}, "
           f"at the end {end:.2f}", ""]
    if header["warning"]:
        top += ["**Measured under load: " + header["warning"].splitlines()[1] + "**", ""]
    (out / f"{name}.md").write_text("\n".join(top + [f"Models: {header['shape']}", "", note, ""] + lines))
    (out / f"{name}.json").write_text(json.dumps({"header": {**header, "load_end": end}, **rows}, indent=1) + "\n")


def method(module):
    """A module's docstring, which says how it measures, as one paragraph."""
    return " ".join(module.__doc__.split())


def checks_table(checks):
    return table(["check", "max abs difference", "tolerance"], [[w, f"{d:.1e}", f"{t:.0e}"] for w, d, t in checks],
                 "Numerical checks (run before timing; the run stops if one fails)")


def write_decode(out, header, checks, decode, constant, generate):
    lines = checks_table(checks)
    t = {(r["length"], r["batch"], r["model"]): r for r in decode}
    lengths, batches = sorted({r["length"] for r in decode}), sorted({r["batch"] for r in decode})
    grid = [(b, n, *(t[(n, b, m)] for m in ("softmax", "t2r", "floor"))) for b in batches for n in lengths]
    ms = "{:.2f}".format
    if decode:
        lines += table(["batch", "prefix L", "softmax ms", "T2R ms", "floor ms", "softmax / T2R", "T2R / floor",
                        "T2R(L) / T2R(shortest)", "wall ms: softmax / T2R / floor"],
                       [[b, n, *(ms(x["step_s"] * 1e3) for x in (s, r, f)), ms(ratio(s, r, "step_s")),
                         ms(ratio(r, f, "step_s")), ms(ratio(r, t[(lengths[0], b, "t2r")], "step_s")),
                         " / ".join(f"{x['wall_s'] * 1e3:.1f}" for x in (s, r, f))] for b, n, s, r, f in grid],
                       "Time per decode step", "*floor*: the same model without attention mixing (projections, FFN "
                       "and output layer kept): no attention variant can beat it. T2R(L) / T2R(shortest) would be "
                       "1.00 without noise.")
    c = {(r["length"], r["batch"]): r for r in constant}
    if constant:
        cl = sorted({r["length"] for r in constant})
        lines += table(["batch", *(f"L={n} ms" for n in cl), "longest / shortest"],
                       [[b, *(ms(c[(n, b)]["step_s"] * 1e3) for n in cl),
                         ms(ratio(c[(cl[-1], b)], c[(cl[0], b)], "step_s"))] for b in sorted({b for _, b in c})],
                       "T2R after every prefix length, side by side",
                       "The T2R model alone, one state per prefix length, taking turns: only the prefix length "
                       "differs.")
    if decode:
        lines += table(["batch", "prefix L", "softmax kv cache held", "T2R state held", "cache / state",
                        "softmax peak in a step", "T2R peak in a step", "floor peak in a step"],
                       [[b, n, human_bytes(s["state_bytes"]), human_bytes(r["state_bytes"]),
                         f"{ratio(s, r, 'state_bytes'):.0f}", *(human_bytes(x["peak_bytes"]) for x in (s, r, f))]
                        for b, n, s, r, f in grid], "Memory of decoding",
                       "Torch tensor bytes. *held*: the incremental state (softmax: the kv cache; T2R: [S | z], "
                       "without its folded projection weights, shared by all sequences). *peak*: allocations minus "
                       "frees (torch.profiler) while copying the prefix state to the batch and taking one step.")
        goals = []
        for b in batches:
            goals.append((f"T2R step at prefix 8192 within 1.10x of prefix 128, batch {b} (side by side)",
                          ratio(c.get((8192, b)), c.get((128, b)), "step_s"), lambda x: x <= 1.10))
            worst, n = max((ratio(t[(n, b, "t2r")], t[(n, b, "floor")], "step_s"), n) for n in lengths)
            goals.append((f"T2R within 1.15x of the floor at every length, batch {b} (worst: L={n})", worst,
                          lambda x: x <= 1.15))
        goals += [(f"T2R >= {goal}x faster than softmax at prefix {n}, batch {b}",
                   ratio(t.get((n, b, "softmax")), t.get((n, b, "t2r")), "step_s"), lambda x, goal=goal: x >= goal)
                  for n, b, goal in ((4096, 1, 4), (2048, 16, 10))]
        lines += ["![decode step time](bench_decode.png)", ""] + targets(goals)
        _plot(out / "bench_decode.png", t, lengths, batches)
    if generate:
        g = {(r["model"], r["beam"]): r for r in generate}
        lines += table(["beam", "tokens", "softmax s", "T2R s", "softmax / T2R", "T2R tokens/s",
                        "wall s: softmax / T2R"],
                       [[beam, r["length"], ms(s["seconds"]), ms(r["seconds"]), ms(ratio(s, r, "seconds")),
                         f"{r['length'] / r['seconds']:.0f}", f"{s['wall']:.1f} / {r['wall']:.1f}"]
                        for beam in sorted({r["beam"] for r in generate})
                        for s, r in [(g[("softmax", beam)], g[("t2r", beam)])]],
                       "End to end: fairseq SequenceGenerator", "Batch 1, one-token prompt, exactly the given number "
                       "of tokens (min_len = max_len), beam search reordering the state; one run after a warm-up.")
    write(out, "bench_decode", header, "Decoding: softmax (kv cache) vs T2R (recurrent state) vs floor",
          f"{TIME_NOTE} {method(decode_module)}", lines, decode=decode, constant=constant, generate=generate)


def _plot(path, t, lengths, batches):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4))
    for ax, b in zip(axes, batches):
        for m, style in (("softmax", "o-"), ("t2r", "s-"), ("floor", "^--")):
            ax.loglog(lengths, [t[(n, b, m)]["step_s"] * 1e3 for n in lengths], style, label=m)
        ax.set(xlabel="prefix length", ylabel="ms per decode step (CPU time)", title=f"batch {b}")
    for b in batches:
        for m, style, label in (("softmax", "o-", "softmax kv cache"), ("t2r", "s-", "T2R state")):
            axes[-1].loglog(lengths, [t[(n, b, m)]["state_bytes"] / 2 ** 20 for n in lengths], style,
                            label=f"{label}, batch {b}")
    axes[-1].set(xlabel="prefix length", ylabel="MiB held", title="decode state: kv cache vs T2R state")
    for ax in axes:
        ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_train(out, header, checks, train):
    lines = checks_table(checks)
    t = {(r["level"], r["length"], r["form"]): r for r in train}
    for level in ("layer", "model"):
        rows = [[n, s["batch"], *(f"{x['token_s'] * 1e6:.1f}" if x else "skipped" for x in (s, r, q)),
                 f"{ratio(s, r, 'token_s'):.2f}", f"{ratio(s, r, 'token_wall_s'):.2f}",
                 *(f"{x['token_bytes'] / 1024:.1f}" if x else "skipped" for x in (s, r, q))]
                for n in sorted({r["length"] for r in train if r["level"] == level})
                for s, r, q in [(t[(level, n, "softmax")], t[(level, n, "t2r")], t.get((level, n, "t2r-naive")))]]
        if rows:
            lines += table(["length", "batch", "softmax us/token", "t2r us/token", "t2r-naive us/token",
                            "softmax / t2r", "softmax / t2r (wall)", "softmax KiB/token", "t2r KiB/token",
                            "t2r-naive KiB/token"], rows, level)
    goals = []
    for level in ("layer", "model"):
        goals += [(f"chunked T2R >= 2x faster than softmax at 4096 ({level}; softmax / t2r)",
                   ratio(t.get((level, 4096, "softmax")), t.get((level, 4096, "t2r")), "token_s"), lambda x: x >= 2),
                  (f"chunked T2R <= 1.3x slower than softmax at 512 ({level}; t2r / softmax)",
                   ratio(t.get((level, 512, "t2r")), t.get((level, 512, "softmax")), "token_s"), lambda x: x <= 1.3)]
    write(out, "bench_train", header, "Training: forward + backward per token, T2R chunked vs softmax vs quadratic T2R",
          f"{TIME_NOTE} {method(train_module)}", lines + targets(goals), train=train)


def write_memory(out, header, memory):
    t = {(r["model"], r["length"]): r for r in memory}
    short, long = min(r["length"] for r in memory), max(r["length"] for r in memory)
    lines = table(["model", "tokens generated", "RSS before generating (baseline)", "peak RSS while generating",
                   "increment (peak - baseline)", "CPU s", "wall s"],
                  [[r["model"], r["length"], human_bytes(r["baseline_bytes"]), human_bytes(r["peak_bytes"]),
                    human_bytes(r["increment_bytes"]), f"{r['seconds']:.1f}", f"{r['wall']:.1f}"] for r in memory])
    # An increment can be 0 (or a page negative): the generation then fit in pages already resident.
    lines += table(["model", f"peak({long}) / peak({short})", f"increment({long}) / increment({short})",
                    f"increment({long}) - increment({short})"],
                   [[m, f"{ratio(n, s, 'peak_bytes'):.3f}",
                     f"{ratio(n, s, 'increment_bytes'):.2f}" if s["increment_bytes"] > 0 else "-",
                     human_bytes(n["increment_bytes"] - s["increment_bytes"])]
                    for m in dict.fromkeys(r["model"] for r in memory) for s, n in [(t[(m, short)], t[(m, long)])]],
                   f"{long} tokens vs {short}", "The baseline (Python, torch, fairseq, the weights) dominates the "
                   "peak; the increments are what generation adds.")
    lines += targets([(f"T2R peak RSS generating {long} tokens grows < 5% over generating {short}",
                       ratio(t[("t2r", long)], t[("t2r", short)], "peak_bytes"), lambda x: x < 1.05)],
                     "Target", fmt="{:.3f}x")
    write(out, "generation_memory", header, "Generation memory: T2R (constant-size state) vs softmax (key/value cache)",
          method(generation_memory), lines, memory=memory)
