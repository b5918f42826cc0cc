"""The documentation's tables and figure, built from the files in results/ so that they cannot disagree.

    python -m docs.generate            # rewrite every generated block of the pages, and the figure
    python -m docs.generate --check    # exit 1 if a page or the figure is not what the results files give

A generated block sits between `<!-- generated: NAME -->` and `<!-- end: NAME -->` in any of the
pages (README.md, results/README.md, docs/*.md); everything outside the markers is left as written.
The figures (FIGURES) carry the numbers they plot in their PNG metadata, so checking them needs no drawing.
"""
import argparse
import itertools
import json
import pathlib
import re
import sys

from examples.demo_report import tables
from tools.kit import human_bytes, minutes

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
PAGES = (ROOT / "README.md", ROOT / "results/README.md", *sorted((ROOT / "docs").glob("*.md")))
FIGURE = ROOT / "results/wikitext2_quality_vs_cost.png"
DISTANCE_FIGURE = ROOT / "results/wikitext2_ppl_by_distance.png"
RECALL_FIGURE = ROOT / "results/recall.png"  # drawn by benchmarks.recall.plot, checked the same way
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end: (?P=name) -->)", re.S)


def _load(name):
    return json.loads((RESULTS / name).read_text())


def use_results(directory):
    """Build from another results directory."""
    global RESULTS
    RESULTS = pathlib.Path(directory)


def _pct(x, base):
    return f"{100 * (x / base - 1):+.1f}%"


def demo_console():
    """The demo's transcript, validation lines in the middle of each training step elided."""
    lines = (RESULTS / "demo/console.txt").read_text().splitlines()
    kept = []
    for i, line in enumerate(lines):
        is_update = "update " in line and "valid ppl" in line
        if is_update and "update " in lines[i - 1] and i + 1 < len(lines) and "update " in lines[i + 1]:
            if kept[-1] != "      ...":
                kept.append("      ...")
            continue
        kept.append(line)
    return "```\n" + "\n".join(kept) + "\n```\n"


def demo_tables():
    demo = _load("demo/results.json")
    m = demo["machine"]
    return (f"Measured by `make demo` (defaults) on {m['cpu']}, {m['cpus']} cores; 1-minute load average "
            f"{m['load_average_start']:.2f} at the start, {m['load_average_end']:.2f} at the end; whole demo "
            f"{minutes(m['wall_seconds'])} wall, {minutes(m['cpu_seconds'])} CPU time "
            f"([demo/report.md](demo/report.md)):\n\n" + tables(demo["runs"], demo["decoding"]) + "\n")


def _load_note(header):
    note = f"1-minute load average {header['load_start']:.2f} at the start, {header['load_end']:.2f} at the end"
    return note + (" (**not idle: read with care**)" if header.get("warning") else "")


def bench_decode():
    data = _load("bench_decode.json")
    t = {(r["length"], r["batch"], r["model"]): r for r in data["decode"]}
    lines = [f"Measured by `make bench` ({data['header']['date']}; {data['header']['machine']}; "
             f"{_load_note(data['header'])}): {data['header']['shape']}, per decode step through fairseq's "
             f"incremental decoding, CPU time of one thread.", "",
             "| batch | prefix | softmax (kv cache) | T2R | floor (no attention) | softmax / T2R | T2R / floor | "
             "kv cache vs T2R state |", "|---|---|---|---|---|---|---|---|"]
    for batch, length in sorted({(b, n) for n, b, _ in t}):
        s, r, f = (t[(length, batch, m)] for m in ("softmax", "t2r", "floor"))
        lines.append(f"| {batch} | {length} | {s['step_s'] * 1e3:.1f} ms | {r['step_s'] * 1e3:.1f} ms | "
                     f"{f['step_s'] * 1e3:.1f} ms | {s['step_s'] / r['step_s']:.1f}x | {r['step_s'] / f['step_s']:.2f} | "
                     f"{human_bytes(s['state_bytes'])} vs {human_bytes(r['state_bytes'])} |")
    # The variants (decay, window) took turns with plain T2R and the floor at the shortest and longest prefix.
    v = {(r["length"], r["batch"], r["model"]): r["step_s"] for r in data.get("variants", [])}
    models = list(dict.fromkeys(m for _, _, m in v if m != "floor"))
    if models:
        lines += ["", "Options, in their own side-by-side turns (step / the floor's, batch 1 and 16, prefix "
                  f"{min(n for n, _, _ in v)} and {max(n for n, _, _ in v)}; every table and target: "
                  "[bench_decode.md](bench_decode.md)):", "",
                  "| model | " + " | ".join(f"batch {b}, prefix {n}" for n, b, m in v if m == "floor") + " |",
                  "|---|" + "---|" * sum(1 for *_, m in v if m == "floor")]
        lines += [f"| {m} | " + " | ".join(f"{v[(n, b, m)] / v[(n, b, 'floor')]:.2f}x" for n, b, f in v if f == "floor")
                  + " |" for m in models]
    return "\n".join(lines) + "\n"


def generation_memory():
    data = _load("generation_memory.json")
    t = {(r["model"], r["length"]): r for r in data["memory"]}
    short, long = min(r["length"] for r in data["memory"]), max(r["length"] for r in data["memory"])

    def peaks(model):
        a, b = t[(model, short)], t[(model, long)]
        return (f"{human_bytes(a['peak_bytes'])} vs {human_bytes(b['peak_bytes'])} "
                f"({b['peak_bytes'] / a['peak_bytes']:.3f}x)")

    return (f"Peak RSS of a fresh process running SequenceGenerator (beam 1) for {short} vs {long} tokens, same "
            f"shape ({_load_note(data['header'])}): T2R {peaks('t2r')}, softmax {peaks('softmax')}.\n")


MULTI30K_ROWS = (
    ("teacher", "teacher (softmax)"),
    ("teacher_continued", "teacher trained on for the finetuning budget"),
    ("t2r_pretrain", "T2R + pretrain"),
    ("t2r_window", "T2R + pretrain, softmax window 64 + linear in decoder self-attention"),
    ("t2r_transfer", "T2R + pretrain, attention transfer (self- and cross-attention)"),
    ("t2r_window_transfer", "T2R + pretrain, window 64 + attention transfer"),
    ("t2r_window_distill", "T2R + pretrain, window 64 + attention transfer and KL (weight 0.5) from the start"),
    ("t2r_softmax_cross", "T2R + pretrain, cross-attention kept softmax"),
    ("elu_pretrain", "ELU + pretrain"),
    ("t2r_cross64", "T2R + pretrain, cross-attention k = 64"),
    ("t2r_cross128", "T2R + pretrain, cross-attention k = 128"),
    ("t2r_cross_hedgehog", "T2R + pretrain, Hedgehog cross-attention map (2 x 32 features)"),
    ("t2r_cross_transfer", "T2R + pretrain, cross-attention k = 128, attention transfer from the start"),
    ("t2r_cross_only_transfer", "T2R + pretrain, cross-attention k = 128, cross-attention transfer alone"),
)


def multi30k(name="multi30k.json"):
    data = _load(name)
    continued = data.get("teacher_continued", {}).get("bleu")
    lines = ["| row | init | updates | valid nll | test BLEU | vs teacher trained on | sentences/s |",
             "|---|---|---|---|---|---|---|"]
    for name, label in MULTI30K_ROWS:
        if name not in data:
            continue
        r = data[name]
        gap = f"{r['bleu'] - continued:+.2f}" if continued is not None else "-"
        init = r.get("init", "random").split(" ")[0]
        lines.append(f"| {label} | {init} | {r['updates']} | {r['valid_nll_loss']:.3f} | {r['bleu']:.2f} | {gap} "
                     f"| {r['sentences_per_s']:.1f} |")
    loads = sorted({data[n]["timing_load"] for n, _ in MULTI30K_ROWS if "timing_load" in data.get(n, {})})
    lines += ["", f"sentences/s: fairseq-generate's own figure (beam 5, batch 128, one thread), the best of "
              f"interleaved runs of every row on {data['setup']['machine']['cpu']}; 1-minute load average at the "
              f"start of the timing pass: {', '.join(f'{x:.2f}' for x in loads) or 'not recorded'}."]
    return "\n".join(lines) + "\n"


WIKITEXT2_ROWS = (
    ("teacher", "teacher (softmax)", "-"),
    ("teacher_continued", "teacher trained on for the finetuning budget", "-"),
    ("t2r_pretrain", "T2R + pretrain", "32"),
    ("elu_pretrain", "ELU + pretrain", "64 (head dim)"),
    ("rfa_pretrain", "RFA + pretrain", "2 x 32"),
    ("t2r_random", "T2R from random init", "32"),
    ("t2r_random_full", "T2R from random init, teacher's budget", "32"),
    ("t2r_transfer", "T2R + pretrain, attention transfer (first third feature maps only)", "32"),
    ("t2r_transfer_joint", "T2R + pretrain, attention transfer (joint from the start)", "32"),
    ("hybrid_50", "hybrid: layer 1 softmax, layer 0 T2R", "32"),
    ("hedgehog_pretrain", "Hedgehog + pretrain", "2 x 32"),
    ("performer_pretrain", "Performer + pretrain", "32"),
    ("t2r_decay_learned", "T2R + pretrain, learned decay", "32"),
    ("t2r_decay_gated", "T2R + pretrain, gated decay", "32"),
    ("t2r_carried", "T2R + pretrain, gated decay, carried-state training", "32"),
    ("t2r_window", "T2R + pretrain, softmax window 64 + linear", "32"),
    ("t2r_window_transfer", "T2R + pretrain, softmax window 64 + linear, attention transfer", "32"),
    ("t2r_window_gated", "T2R + pretrain, softmax window 64 + linear, gated decay", "32"),
    ("t2r_window_distill", "T2R + pretrain, softmax window 64 + linear, attention transfer + KL to the teacher", "32"),
    ("t2r_delta", "T2R + pretrain, delta rule (DeltaNet)", "32"),
    ("t2r_gated_delta", "T2R + pretrain, gated delta rule (Gated DeltaNet)", "32"),
    ("t2r_gated_delta_long", "T2R + pretrain, gated delta rule, gates from 2048 tokens", "32"),
    ("t2r_gated_delta_norm", "T2R + pretrain, gated delta rule, DeltaNet's read-out (RMS norm)", "32"),
    ("t2r_gated_then_carried", "T2R + pretrain, gated decay, 200 on blocks then 100 carried", "32"),
    ("t2r_gated_then_carried16", "T2R + pretrain, gated decay, 200 on blocks then 100 carried (16 x 128)", "32"),
    ("t2r_gated_long_then_carried", "T2R + pretrain, gated decay from 2048 tokens, 200 on blocks then 100 carried",
     "32"),
    ("t2r_gated_delta_then_carried", "T2R + pretrain, gated delta rule, 200 on blocks then 100 carried", "32"),
    ("t2r_gated_history", "T2R + pretrain, gated decay, up to 4 blocks of history before each block", "32"),
    ("t2r_gated_delta_history", "T2R + pretrain, gated delta rule, up to 4 blocks of history before each block",
     "32"),
    ("t2r_gated_delta_history8", "T2R + pretrain, gated delta rule, up to 8 blocks of history before each block",
     "32"),
    ("t2r_gated_delta_history16", "T2R + pretrain, gated delta rule, up to 16 blocks of history before each block",
     "32"),
    ("t2r_gated_delta_long_history", "T2R + pretrain, gated delta rule, gates from 2048 tokens, up to 4 blocks of "
     "history", "32"),
    ("teacher_continued_2x", "teacher trained on for twice the finetuning budget", "-"),
    ("t2r_gated_delta_history_2x", "T2R + pretrain, gated delta rule, up to 8 blocks of history, twice the budget",
     "32"),
    ("t2r_gated_delta_history_2x_seed2", "the same, seed 2", "32"),
)


def cross_attention():
    from benchmarks.cross_attention import table, verdict

    data = _load("cross_attention.json")
    return (table(data["rows"]) + f"\n\n`{data['command']}` on {data['machine']}; {data['shape']}; beam "
            f"{data['beam']}, {data['output_length']} target tokens, {data['batch']} sentences per call; 1-minute "
            f"load average {data['load_start']:.2f} at the start, {data['load_end']:.2f} at the end. "
            f"{verdict(data['crossing'])}.\n")


def _carried(row):
    """Test ppl with the state carried across the whole split; † marks the former t2r-eval-stream's."""
    if "test_ppl_carried" in row:
        return f"{row['test_ppl_carried']:.2f}"
    return f"{row['test_ppl_stream']:.2f} †" if "test_ppl_stream" in row else "-"


def wikitext2():
    data = _load("wikitext2.json")
    teacher, continued = data["teacher"]["test_ppl"], data["teacher_continued"]["test_ppl"]
    # Not the training minutes: wall clock next to other jobs (they stay in the file).
    lines = ["| row | init | updates | feature size | valid ppl | test ppl | vs teacher | "
             "vs teacher trained on | test ppl, state carried over the whole split |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, label, features in WIKITEXT2_ROWS:
        if name not in data:
            continue
        r = data[name]
        # A row given twice the budget is measured against the teacher trained on for as long.
        twice = data.get("teacher_continued_2x", {})
        bar = twice["test_ppl"] if twice and r["updates"] == twice["updates"] else continued
        lines.append(f"| {label} | {r.get('init', 'random')} | {r['updates']} | {features} | "
                     f"{r['valid_ppl']:.2f} | {r['test_ppl']:.2f} | {_pct(r['test_ppl'], teacher)} | "
                     f"{_pct(r['test_ppl'], bar)} | {_carried(r)} |")
    lines += ["", "State carried: `fairseq-eval-lm --task t2r_truncated_bptt_lm --batch-size 8` on the test split, "
              "every token scored once with all of its history in its stream; † the former `t2r-eval-stream` "
              "(8 streams, the same protocol), for rows of the first teacher whose checkpoints were not kept."]
    decode = [(label, data[n]["decode_ms_per_token"]) for n, label, _ in WIKITEXT2_ROWS
              if "decode_ms_per_token" in data.get(n, {})]
    if decode:
        lengths = list(decode[0][1])
        lines += ["", "Decode cost per token (ms, batch 1, one thread; "
                  "`python -m examples.language_model.decode_speed`):",
                  "",
                  "| row | " + " | ".join(f"prefix {n}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]
        lines += [f"| {label} | " + " | ".join(f"{ms[n]:.2f}" for n in lengths) + " |" for label, ms in decode]
    return "\n".join(lines) + "\n"


HEADLINE = (  # (setting, its options, WikiText-2 row, the row whose decode cost it has, Multi30k row)
    ("softmax, trained on for the same updates (the bar)", "-", "teacher_continued", "teacher", "teacher_continued"),
    ("T2R, the paper's", "(defaults)", "t2r_pretrain", "t2r_pretrain", "t2r_pretrain"),
    ("T2R, gated decay", "`--t2r-decay gated`", "t2r_decay_gated", "t2r_decay_gated", None),
    ("T2R, softmax window 64 + linear", "`--t2r-window 64`", "t2r_window", "t2r_window", "t2r_window"),
    ("T2R, Gated DeltaNet", "`--t2r-update delta --t2r-decay gated`", "t2r_gated_delta", "t2r_gated_delta", None),
    # --history-blocks is training only: the same model, so the same decode cost.
    ("T2R, Gated DeltaNet trained with history", "`--t2r-update delta --t2r-decay gated --history-blocks 8`",
     "t2r_gated_delta_history8", "t2r_gated_delta", None),
    ("T2R, window 64 + gated decay", "`--t2r-window 64 --t2r-decay gated`", "t2r_window_gated", "t2r_window_gated",
     None),
    ("hybrid: top layer softmax", "`--t2r-softmax-layers 1`", "hybrid_50", None, None),
    ("T2R, cross-attention k = 128, attention transfer", "`--t2r-cross-feature-dim 128`, `--criterion "
     "t2r_attention_transfer`", None, None, "t2r_cross_transfer"),
    ("T2R, cross-attention kept softmax", "`--t2r-cross-attention softmax`", None, None, "t2r_softmax_cross"),
)


def _longest_prefix(lm):
    return max(lm["teacher"]["decode_ms_per_token"], key=int)


def headline():
    """The recommended settings side by side: quality against the softmax model given the same updates, and
    decode cost against the teacher's."""
    lm, mt = _load("wikitext2.json"), _load("multi30k_cross.json")  # the newer Multi30k run: one teacher, every row
    bar, bleu_bar, prefix = lm["teacher_continued"]["test_ppl"], mt["teacher_continued"]["bleu"], _longest_prefix(lm)
    teacher_ms = lm["teacher"]["decode_ms_per_token"][prefix]
    lines = [f"| setting | options | WikiText-2 test ppl | vs the bar | test ppl, whole split as one stream | "
             f"ms/token after {prefix} tokens | Multi30k BLEU | vs the bar |", "|---|---|---|---|---|---|---|---|"]
    for setting, options, lm_row, decode_row, mt_row in HEADLINE:
        cells = ["-"] * 6
        if lm_row:
            r = lm[lm_row]
            cells[:3] = [f"{r['test_ppl']:.2f}", _pct(r["test_ppl"], bar), _carried(r)]
        if decode_row:
            ms = lm[decode_row]["decode_ms_per_token"][prefix]
            cells[3] = f"{ms:.2f} ({ms / teacher_ms:.2f}x)"
        if mt_row:
            cells[4:] = [f"{mt[mt_row]['bleu']:.2f}", f"{mt[mt_row]['bleu'] - bleu_bar:+.2f}"]
        lines.append(f"| {setting} | {options} | " + " | ".join(cells) + " |")
    window = re.search(r"--context-window (\d+)", lm["setup"]["eval"]).group(1)
    lines += ["", f"WikiText-2: a small `transformer_lm` teacher ({lm['teacher']['updates']} updates), every other "
              f"row {lm['teacher_continued']['updates']} more updates from it; perplexity per BPE token with a "
              f"{window}-token context window, and with the state carried over the whole test split where every "
              "layer is recurrent. Decode cost: batch 1, one thread, CPU; softmax's is the teacher's (the same "
              f"model). Multi30k: a small transformer, {mt['teacher_continued']['updates']} updates from a "
              f"{mt['teacher']['updates']}-update teacher, beam 5, sacreBLEU. Every row, and the rest: "
              "[results/README.md](results/README.md)."]
    return "\n".join(lines) + "\n"


def figure_data():
    """What the figure plots: per WikiText-2 row with a decode cost, (label, ms/token after the longest prefix,
    test ppl); and the bar, the softmax model trained on for the same updates."""
    lm = _load("wikitext2.json")
    prefix = _longest_prefix(lm)
    points = [[label.replace("T2R + pretrain, ", ""), lm[name]["decode_ms_per_token"][prefix], lm[name]["test_ppl"]]
              for name, label, _ in WIKITEXT2_ROWS if "decode_ms_per_token" in lm.get(name, {})]
    return {"prefix": prefix, "points": points, "bar": lm["teacher_continued"]["test_ppl"]}


def _plotted(path):
    """The numbers a PNG of ours plots (its metadata), or None."""
    from PIL import Image

    if not path.is_file():
        return None
    with Image.open(path) as image:
        return json.loads(image.text.get("t2r-data", "null"))


def figure_is_current(path=FIGURE):
    """Whether the PNG at path plots what the results files hold (read from its metadata, not its pixels)."""
    return path.is_file() and _plotted(path) == figure_data()


def recall():
    from benchmarks.recall import setup_line, table

    data = _load("recall.json")
    return f"{table(data)}\n\n`{data['setup']['command'].split(' --notes')[0]}`: {setup_line(data)}\n"


def recall_figure_is_current(path=RECALL_FIGURE):
    from benchmarks.recall import plot_data

    return path.is_file() and _plotted(path) == plot_data(_load("recall.json"))


def draw_recall_figure(path=RECALL_FIGURE):
    from benchmarks.recall import plot

    plot(_load("recall.json"), path)


def draw_figure(path=FIGURE):
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    data = figure_data()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    # A legend, not labels beside the points: rows of nearly equal cost and quality overlap.
    shapes = itertools.cycle("osD^vP")
    for label, ms, ppl in data["points"]:
        teacher = label == "teacher (softmax)"
        ax.plot(ms, ppl, "*" if teacher else next(shapes), markersize=14 if teacher else 8, linestyle="none",
                label=label)
    ax.axhline(data["bar"], color="gray", linestyle="--", label="teacher trained on for the same updates (the bar)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_xlabel(f"decode ms/token after {data['prefix']} tokens (batch 1, one CPU thread)")
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title("WikiText-2: quality against decode cost")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"t2r-data": json.dumps(data)})
    plt.close(fig)


def distance_figure_data():
    """What the distance figure plots: [label, {bucket: test ppl}] for the teacher (windowed), the T2R row
    with the lowest windowed test ppl and the one with the lowest carried test ppl, among the rows whose
    scores by distance are recorded (`python -m examples.language_model.wikitext2 --by-distance`);
    None before any are."""
    lm = _load("wikitext2.json")
    labels = {name: label for name, label, _ in WIKITEXT2_ROWS}
    # At the finetuning budget, as the teacher's finetuned rows: not the rows given twice as many updates.
    budget = lm["teacher_continued"]["updates"]
    t2r = [name for name in labels if "feature_map" in lm.get(name, {}) and lm[name]["updates"] == budget]
    windowed = [name for name in t2r if "test_ppl_by_distance" in lm[name]]
    carried = [name for name in t2r if "test_ppl_by_distance_carried" in lm[name]]
    lines = []
    if "test_ppl_by_distance" in lm.get("teacher", {}):
        lines.append([f"{labels['teacher']}, windowed", lm["teacher"]["test_ppl_by_distance"]])
    if windowed:
        best = min(windowed, key=lambda name: lm[name]["test_ppl"])
        lines.append([f"{labels[best]}, windowed", lm[best]["test_ppl_by_distance"]])
    if carried:
        best = min(carried, key=lambda name: lm[name]["test_ppl_carried"])
        lines.append([f"{labels[best]}, state carried", lm[best]["test_ppl_by_distance_carried"]])
    if not lines:
        return None
    window = re.search(r"--context-window (\d+)", lm["setup"]["eval"]).group(1)
    return {"window": int(window), "lines": lines}


def wikitext2_by_distance():
    """Test perplexity by distance from the stream start, for every row that has it recorded."""
    lm = _load("wikitext2.json")
    scored = [(f"{label}, {how}", lm[name][key]) for name, label, _ in WIKITEXT2_ROWS
              for key, how in (("test_ppl_by_distance", "windowed"), ("test_ppl_by_distance_carried", "state carried"))
              if key in lm.get(name, {})]
    if not scored:
        return "(not recorded yet: `python -m examples.language_model.wikitext2 --rows ... --by-distance`)\n"
    buckets = list(scored[0][1])
    lines = ["| row, scoring | " + " | ".join(f"tokens {b}" for b in buckets) + " |", "|---|" + "---:|" * len(buckets)]
    lines += [f"| {label} | " + " | ".join(f"{ppl[b]:.2f}" for b in buckets) + " |" for label, ppl in scored]
    return "\n".join(lines) + ("\n\nTokens counted from the start of their stream (the test split cut into 8 "
                               "streams, as the carried scoring reads it); windowed rows scored with the usual "
                               "128-token window and mapped onto the same streams.\n")


def distance_figure_is_current(path=DISTANCE_FIGURE):
    """Whether the PNG plots what the results hold; before any scores by distance are recorded, that it is absent."""
    data = distance_figure_data()
    return _plotted(path) == data if path.is_file() else data is None


def draw_distance_figure(path=DISTANCE_FIGURE):
    data = distance_figure_data()
    if data is None:
        path.unlink(missing_ok=True)
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Buckets in order of distance, as categories: their widths differ by 4x and more.
    buckets = sorted({b for _, ppl in data["lines"] for b in ppl}, key=lambda b: int(re.match(r"\d+", b).group()))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for (label, ppl), shape in zip(data["lines"], "*os"):
        xs = [i for i, b in enumerate(buckets) if b in ppl]
        ax.plot(xs, [ppl[buckets[i]] for i in xs], marker=shape, markersize=10 if shape == "*" else 7, label=label)
    ax.set_xticks(range(len(buckets)), [f"{b}" for b in buckets])
    ax.set_xlabel("tokens since the start of the stream (the test split as 8 streams)")
    ax.set_ylabel("test perplexity (lower is better)")
    ax.set_title(f"WikiText-2: perplexity by distance from the stream start (window: {data['window']} tokens)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"t2r-data": json.dumps(data)})
    plt.close(fig)


FIGURES = {FIGURE: (figure_is_current, draw_figure), DISTANCE_FIGURE: (distance_figure_is_current, draw_distance_figure),
           RECALL_FIGURE: (recall_figure_is_current, draw_recall_figure)}


GENERATORS = {"headline": headline, "demo-console": demo_console, "demo-tables": demo_tables,
              "bench-decode": bench_decode, "generation-memory": generation_memory, "multi30k": multi30k,
              "multi30k-cross": lambda: multi30k("multi30k_cross.json"), "cross-attention": cross_attention,
              "wikitext2": wikitext2, "recall": recall,
              "wikitext2-by-distance": wikitext2_by_distance}


def render(text: str) -> str:
    def block(match):
        name = match.group("name")
        if name not in GENERATORS:
            raise SystemExit(f"error: generated block {name!r} has no generator; known: {', '.join(GENERATORS)}")
        return match.group(1) + GENERATORS[name]() + match.group(4)

    return BLOCK.sub(block, text)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m docs.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("pages", nargs="*", type=pathlib.Path, default=PAGES, help="pages to fill (default: all)")
    p.add_argument("--results", type=pathlib.Path, default=RESULTS, help="results directory")
    p.add_argument("--check", action="store_true", help="only check; exit 1 when a page or the figure is stale")
    args = p.parse_args(argv)
    use_results(args.results)
    pages = {page: render(page.read_text()) for page in args.pages}
    stale = [page for page, text in pages.items() if page.read_text() != text]
    figures_stale = [path for path, (is_current, _) in FIGURES.items() if not is_current()]
    if args.check:
        for path in stale + figures_stale:
            print(f"{path} is stale: run `python -m docs.generate`", file=sys.stderr)
        return 1 if stale or figures_stale else 0
    for page in stale:
        page.write_text(pages[page])
    for path in figures_stale:
        FIGURES[path][1]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
