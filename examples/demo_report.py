"""The demo's outputs: report.md (tables), results.json (the same numbers, for scripts and
tests), decode_time.png and ppl_vs_updates.png."""
import json
import pathlib

from tools.kit import human_bytes, minutes

ROWS = (  # (run name, model, initialized from)
    ("softmax", "softmax transformer_lm", "random"),
    ("softmax_continued", "softmax, trained on for the same updates (fair baseline)", "softmax weights"),
    ("t2r_swapped", "T2R, swapped, not finetuned", "softmax weights"),
    ("t2r_converted", "T2R, swap-then-finetune", "softmax weights"),
    ("t2r_random", "T2R, trained from scratch", "random"),
)


def tables(runs: dict, decoding: dict) -> str:
    lines = ["Perplexity (BPE tokens; fairseq-eval-lm, lower is better)", "",
             "| model | initialized from | updates (softmax + T2R) | fairseq-train wall time (CPU time) | valid ppl | test ppl |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    pretrained = runs["softmax"]["updates"]
    for name, model, init in ROWS:
        r = runs[name]
        # Swapped models also carry the softmax model's training: count it.
        updates = f"{pretrained} + {r['updates']}" if init == "softmax weights" else str(r["updates"])
        took = "-" if r["train_seconds"] is None else \
            f"{minutes(r['train_seconds'])} ({minutes(r['train_cpu_seconds'])})"
        lines.append(f"| {model} | {init} | {updates} | {took} "
                     f"| {r['valid_ppl']:.2f} | {r['test_ppl']:.2f} |")
    lines += ["", swap_cost(runs)]
    lines += ["", "Generation: one sequence, fairseq incremental decoding, cost of the next token after a prefix of "
              "L tokens (ms: CPU time of one thread, which is wall time on an idle core)",
              "", "| prefix L | softmax ms/token | T2R ms/token | softmax key/value cache | T2R recurrent state |",
              "| ---: | ---: | ---: | ---: | ---: |"]
    for soft, t2r in zip(decoding["softmax"], decoding["t2r"]):
        lines.append(f"| {soft['prefix']} | {soft['ms_per_token']:.2f} | {t2r['ms_per_token']:.2f} "
                     f"| {human_bytes(soft['state_bytes'])} | {human_bytes(t2r['state_bytes'])} |")
    return "\n".join(lines)


def swap_cost(runs: dict) -> str:
    """What swapping costs, against the fair baseline (the softmax model given the same extra updates)."""
    base, t2r = runs["softmax_continued"], runs["t2r_converted"]
    change = 100 * (t2r["test_ppl"] / base["test_ppl"] - 1)
    return (f"What the swap costs: after the same {t2r['updates']} extra updates, T2R (swap-then-finetune) has test "
            f"perplexity {t2r['test_ppl']:.2f} against {base['test_ppl']:.2f} for the softmax model trained on "
            f"({change:+.1f}%). The softmax model stopped at {runs['softmax']['updates']} updates "
            f"({runs['softmax']['test_ppl']:.2f}) is still improving, so it is not the bar to beat.")


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_decoding(decoding: dict, path: pathlib.Path):
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label, style in (("softmax", "softmax (key/value cache)", "o-"),
                                 ("t2r", "T2R (recurrent state)", "s-")):
        rows = decoding[name]
        prefixes = [r["prefix"] for r in rows]
        left.plot(prefixes, [r["ms_per_token"] for r in rows], style, label=label)
        right.plot(prefixes, [r["state_bytes"] for r in rows], style, label=label)
    for ax, ylabel in ((left, "ms per token (CPU, 1 thread)"), (right, "held between steps")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(prefixes, [str(p) for p in prefixes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("prefix length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    left.set_ylim(bottom=0)
    right.set_yscale("log", base=2)
    # Ticks at powers of 4 bytes read as 1 KiB, 4 KiB, 16 KiB, ...
    right.yaxis.set_major_locator(LogLocator(base=4))
    right.yaxis.set_major_formatter(FuncFormatter(lambda y, _: human_bytes(y)))
    right.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle("Generation cost as the prefix grows (batch 1)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(runs: dict, path: pathlib.Path):
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    # The converted curve starts from the swapped, not yet finetuned, model at update 0.
    converted = [(0, runs["t2r_swapped"]["valid_ppl"])] + runs["t2r_converted"]["curve"]
    continued = [(0, runs["softmax"]["valid_ppl"])] + runs["softmax_continued"]["curve"]
    for points, label, style in ((continued, "softmax, trained on (fair baseline)", "o-"),
                                 (converted, "T2R, swap-then-finetune", "s-"),
                                 (runs["t2r_random"]["curve"], "T2R, random init", "^-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.axhline(runs["softmax"]["valid_ppl"], color="gray", linestyle="--",
               label=f"softmax transformer at {runs['softmax']['updates']} updates")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))  # 10, 20, 50, 100, ...
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("updates after pretraining")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title("Swap-then-finetune vs the softmax model trained on, and T2R from scratch")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: pathlib.Path, args, runs: dict, decoding: dict, machine: dict) -> str:
    """Write every output; returns the tables (markdown) for printing."""
    text = tables(runs, decoding)
    settings = (f"{args.layers} layers, width {args.embed_dim}, {args.heads} heads, T2R feature size "
                f"{args.feature_dim}; BPE vocabulary {args.vocab_size}; blocks of {args.tokens_per_sample} tokens, "
                f"{args.max_tokens} tokens per batch")
    (out / "report.md").write_text(
        "# T2R demo: swap-then-finetune\n\n"
        f"Corpus: {args.data or 'Python reference documentation (pydoc_data.topics)'}. Models: {settings}.\n\n"
        f"{text}\n\n"
        "![decode time](decode_time.png)\n\n![perplexity vs updates](ppl_vs_updates.png)\n\n"
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, {machine['platform']}, Python {machine['python']}. "
        f"Whole demo: {minutes(machine['wall_seconds'])} wall, {minutes(machine['cpu_seconds'])} CPU time "
        f"(all processes). Wall times grow with other work on the machine: 1-minute load average "
        f"{machine['load_average_start']:.1f} at the start, {machine['load_average_end']:.1f} at the end.\n\n"
        "Each fairseq command line and its output: `logs/`.\n")
    results = {"args": vars(args), "machine": machine, "decoding": decoding,
               "runs": {name: {k: str(v) if k == "checkpoint" else v for k, v in r.items()}
                        for name, r in runs.items()}}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_decoding(decoding, out / "decode_time.png")
    plot_curves(runs, out / "ppl_vs_updates.png")
    return text
