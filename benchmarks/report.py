"""The reports: markdown per benchmark (its method: the measuring module's docstring) and its rows as JSON
beside it. A table is columns (head, cell(item)) over items; a target is (what, measured value or None,
operator, bound), met when operator(value, bound)."""
import json
from operator import ge, le, lt

from tools import kit
from tools.kit import human_bytes

from . import decode as decode_module
from . import generation_memory
from . import train as train_module
from .models import WINDOW

# Per variant (models.VARIANTS): its decode step / the floor's, at the shortest and the longest prefix, every
# batch; one layer's forward + backward at length 4096 / plain chunked T2R's.
VARIANT_TARGETS = {"t2r_fixed": (1.05, 1.3), "t2r_learned": (1.05, 1.3), "t2r_gated": (1.15, 1.3),
                   "t2r_window": (1.2, 1.5), "t2r_delta": (1.15, 2.0), "t2r_gated_delta": (1.15, 2.0)}
VARIANTS_TITLE = f"decay of the state (--t2r-decay), sliding window (--t2r-window {WINDOW})"
FLAT = 1.10  # target: decode step after the longest prefix / after the shortest
LABELS = {"softmax": "softmax", "t2r": "T2R", "floor": "floor"}
ms, us, kib = (lambda v: f"{v * 1e3:.2f}"), (lambda v: f"{v * 1e6:.1f}"), (lambda v: f"{v / 1024:.1f}")
two = "{:.2f}".format


def field(name, fmt=str):
    return lambda x: fmt(x[name])


def at(key, name, fmt):
    """The cell of item[key][name], or "skipped" where the item has no such row."""
    return lambda x: fmt(x[key][name]) if x.get(key) else "skipped"


def ratio(a, b, name="step_s"):
    return a[name] / b[name] if a and b else None


def over(a, b, name="step_s", fmt=two):
    return lambda x: fmt(ratio(x[a], x[b], name))


def pivot(rows, keys, column):
    """One item per value of `keys`, holding each of its rows under the row's `column`, sorted by the first
    key, else in measured order: pivot(rows, ["batch"], "model") -> [{"batch": 1, "t2r": row, ...}, ...]."""
    items = {}
    for r in rows:
        items.setdefault(tuple(r[k] for k in keys), {k: r[k] for k in keys})[r[column]] = r
    return sorted(items.values(), key=lambda x: x[keys[0]])


def table(columns, items, title=None, note=None):
    """Markdown lines under an optional `## title` and note, and a blank line after the table."""
    return ([f"## {title}", ""] if title else []) + ([note, ""] if note else []) + [
        "| " + " | ".join(head for head, _ in columns) + " |", "|" + "---|" * len(columns),
        *("| " + " | ".join(str(cell(x)) for _, cell in columns) + " |" for x in items), ""]


def targets(goals, title="Targets", fmt="{:.2f}x".format):
    return table([("target", field(0)), ("measured", lambda g: "not measured" if g[1] is None else fmt(g[1])),
                  ("", lambda g: "-" if g[1] is None else "met" if g[2](g[1], g[3]) else "MISSED")], goals, title)


def write(out, name, header, title, module, lines, checks=(), **rows):
    """<name>.md (title, machine, method, the numerical checks, `lines`) and <name>.json (header, rows)."""
    end = kit.load_average()
    top = [f"# {title}", "", f"Command: `{header['command']}` ({header['date']})", "",
           f"Machine: {header['machine']}; 1-minute load average at the start {header['load_start']:.2f}, "
           f"at the end {end:.2f}", ""]
    if header["warning"]:
        top += ["**Measured under load: " + header["warning"].splitlines()[1] + "**", ""]
    top += [f"Models: {header['shape']}", "", " ".join(module.__doc__.split()), ""]
    if checks:
        top += table([("check", field(0)), ("max abs difference", field(1, "{:.1e}".format)),
                      ("tolerance", field(2, "{:.0e}".format))], checks,
                     "Numerical checks (run before timing; the run stops if one fails)")
    (out / f"{name}.md").write_text("\n".join(top + lines))
    (out / f"{name}.json").write_text(json.dumps({"header": {**header, "load_end": end}, **rows}, indent=1) + "\n")


def write_decode(out, header, checks, decode, constant, variants):
    """Tables and targets of the three decode_rows runs: every model, T2R alone over L, the variants."""
    grid, flat = pivot(decode, ["batch", "length"], "model"), pivot(constant, ["batch"], "length")
    lengths = sorted({x["length"] for x in grid})
    short, long = lengths[0], lengths[-1]
    lines = table([("batch", field("batch")), ("prefix L", field("length")),
                   *((f"{label} ms", at(m, "step_s", ms)) for m, label in LABELS.items()),
                   ("softmax / T2R", over("softmax", "t2r")), ("T2R / floor", over("t2r", "floor"))],
                  grid, "Time per decode step", "*floor*: the same model without attention mixing (projections, FFN "
                  "and output layer kept): no attention variant can beat it.")
    lines += table([("batch", field("batch")), *((f"L={n} ms", at(n, "step_s", ms)) for n in lengths),
                    ("longest / shortest", over(long, short))], flat, "T2R after every prefix length, side by side",
                   "The T2R model alone, one state per prefix length, taking turns: only the prefix length differs.")
    lines += table([("batch", field("batch")), ("prefix L", field("length")),
                    ("softmax kv cache held", at("softmax", "state_bytes", human_bytes)),
                    ("T2R state held", at("t2r", "state_bytes", human_bytes)),
                    ("cache / state", over("softmax", "t2r", "state_bytes", "{:.0f}".format)),
                    *((f"{label} peak in a step", at(m, "peak_bytes", human_bytes)) for m, label in LABELS.items())],
                   grid, "Memory of decoding", "Torch tensor bytes. *held*: the incremental state (T2R: [S | z], not "
                   "its projection weights, shared by all sequences). *peak*: while copying the prefix state to the "
                   "batch and taking one step.")
    items = pivot(variants, ["batch", "model"], "length")
    floor = {x["batch"]: x for x in items if x["model"] == "floor"}
    over_floor = lambda x, n: ratio(x[n], floor[x["batch"]][n])  # noqa: E731
    lines += table([("batch", field("batch")), ("model", field("model")),
                    *((f"L={n} ms", at(n, "step_s", ms)) for n in (short, long)),
                    *((f"/ floor at L={n}", lambda x, n=n: two(over_floor(x, n))) for n in (short, long)),
                    ("longest / shortest", over(long, short)), ("state held", at(long, "state_bytes", human_bytes))],
                   items, f"Variants: {VARIANTS_TITLE}: time per decode step", "T2R with each option (same weights), "
                   "plain T2R and the floor, all taking turns at the shortest and the longest prefix.")

    goals, cell = [], {(r["length"], r["batch"], r["model"]): r for r in decode}
    for x in flat:
        worst = max((y for y in grid if y["batch"] == x["batch"]), key=lambda y: ratio(y["t2r"], y["floor"]))
        goals += [(f"T2R step at prefix {long} within {FLAT:.2f}x of prefix {short}, batch {x['batch']} "
                   "(side by side)", ratio(x[long], x[short]), le, FLAT),
                  (f"T2R within 1.15x of the floor at every length, batch {x['batch']} (worst: L={worst['length']})",
                   ratio(worst["t2r"], worst["floor"]), le, 1.15)]
    goals += [(f"T2R >= {bound}x faster than softmax at prefix {n}, batch {b}",
               ratio(cell.get((n, b, "softmax")), cell.get((n, b, "t2r"))), ge, bound)
              for n, b, bound in ((4096, 1, 4), (2048, 16, 10))]
    for m, (bound, _) in VARIANT_TARGETS.items():
        mine = [x for x in items if x["model"] == m]
        goals += [(f"{m} within {bound:.2f}x of the floor at prefix {short} and {long}, every batch (worst)",
                   max((over_floor(x, n) for x in mine for n in (short, long)), default=None), le, bound),
                  (f"{m} step at prefix {long} within {FLAT:.2f}x of prefix {short}, every batch (worst)",
                   max((ratio(x[long], x[short]) for x in mine), default=None), le, FLAT)]
    write(out, "bench_decode", header, "Decoding: softmax (kv cache) vs T2R (recurrent state) vs floor", decode_module,
          lines + targets(goals), checks, decode=decode, constant=constant, variants=variants)


def write_train(out, header, checks, train):
    lines, variants = [], [m for m in VARIANT_TARGETS if any(r["form"] == m for r in train)]
    for level in ("layer", "model"):
        items = pivot([r for r in train if r["level"] == level], ["length"], "form")
        for forms, over_t2r, title in ((("softmax", "t2r", "t2r-naive"), ("softmax",), level),
                                       (("t2r", *variants), variants, f"{level}: {VARIANTS_TITLE}")):
            if any(forms[1] in x for x in items):  # measured at this level
                lines += table([("length", field("length")), ("batch", lambda x: x["t2r"]["batch"]),
                                *((f"{f} us/token", at(f, "token_s", us)) for f in forms),
                                *((f"{m} / t2r", over(m, "t2r", "token_s")) for m in over_t2r),
                                *((f"{f} KiB/token", at(f, "token_bytes", kib)) for f in forms)], items, title)
    cell = {(r["level"], r["length"], r["form"]): r for r in train}

    def per_token(a, b, length=4096, level="layer"):  # time per token of form a / of form b
        return ratio(cell.get((level, length, a)), cell.get((level, length, b)), "token_s")
    goals = [goal for level in ("layer", "model") for goal in (
        (f"chunked T2R >= 2x faster than softmax at 4096 ({level}; softmax / t2r)",
         per_token("softmax", "t2r", level=level), ge, 2),
        (f"chunked T2R <= 1.3x slower than softmax at 512 ({level}; t2r / softmax)",
         per_token("t2r", "softmax", 512, level), le, 1.3))]
    goals += [(f"chunked {m} within {bound}x of plain chunked T2R at 4096 (layer; {m} / t2r)",
               per_token(m, "t2r"), le, bound) for m, (_, bound) in VARIANT_TARGETS.items()]
    goals += [("chunked t2r_window faster than softmax at 4096 (layer; t2r_window / softmax)",
               per_token("t2r_window", "softmax"), lt, 1)]
    write(out, "bench_train", header, "Training: forward + backward per token, T2R chunked vs softmax vs quadratic T2R",
          train_module, lines + targets(goals), checks, train=train)


def write_memory(out, header, memory):
    short, long = min(r["length"] for r in memory), max(r["length"] for r in memory)
    lines = table([("model", field("model")), ("tokens generated", field("length")),
                   ("RSS before generating (baseline)", field("baseline_bytes", human_bytes)),
                   ("peak RSS while generating", field("peak_bytes", human_bytes)),
                   ("increment (peak - baseline)", field("increment_bytes", human_bytes)),
                   ("CPU s", field("seconds", "{:.1f}".format))], memory)
    # An increment can be 0 (or a page negative): the generation then fit in pages already resident.
    items = pivot(memory, ["model"], "length")
    lines += table([("model", field("model")),
                    (f"peak({long}) / peak({short})", over(long, short, "peak_bytes", "{:.3f}".format)),
                    (f"increment({long}) / increment({short})",
                     lambda x: over(long, short, "increment_bytes")(x) if x[short]["increment_bytes"] > 0 else "-")],
                   items, f"{long} tokens vs {short}", "The baseline (Python, torch, fairseq, the weights) dominates "
                   "the peak; the increments are what generation adds.")
    t2r = next(x for x in items if x["model"] == "t2r")
    lines += targets([(f"T2R peak RSS generating {long} tokens grows < 5% over generating {short}",
                       ratio(t2r[long], t2r[short], "peak_bytes"), lt, 1.05)], "Target", "{:.3f}x".format)
    write(out, "generation_memory", header, "Generation memory: T2R (constant-size state) vs softmax (key/value cache)",
          generation_memory, lines, memory=memory)
