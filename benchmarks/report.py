"""Markdown tables, the decode plot, the targets and a torch.profiler table of a step."""
import torch

from tools import kit

from .measure import human_bytes
from .models import prefill

MEMORY_NOTE = ("Memory is counted in torch tensor bytes. *held*: the bytes of every tensor in the "
               "incremental state after the step (softmax: the key/value cache; T2R: the packed [S | z]; floor: "
               "nothing; T2R's folded projection weights, kept there once per decoding run and shared by all "
               "sequences, are not counted). *peak in a step*: the maximum of "
               "torch allocations minus frees over building that state (a copy of the batch-1 prefix state) and "
               "then one decode step, from torch.profiler's memory events (profile_memory=True): the state plus "
               "the step's activations and logits and, for softmax, the new cache torch.cat builds before the "
               "old one is freed. Parameters (the same for all three) are not counted. Not RSS: that would mix "
               "in the Python heap and pages the allocator keeps after a free.")


TIME_NOTE = ("Times are process CPU time with one torch thread (median over interleaved rounds): with one "
             "thread, CPU time is the work itself, and wall time adds whatever the process waited for a core. "
             "Both still include memory stalls. Wall-clock medians are given beside them; on an idle machine "
             "the two agree.")


def _header(title, header, note=TIME_NOTE):
    lines = [f"# {title}", "", f"Command: `{header['command']}` ({header['date']})", "",
             f"Machine: {header['machine']}; 1-minute load average at the start {header['load_start']:.2f}, "
             f"at the end {kit.load_average():.2f}", ""]
    if header.get("warning"):
        lines += ["**Measured under load: " + header["warning"].splitlines()[1] + "**", ""]
    return lines + [f"Models: {header['shape']}", "", note, ""]


def _checks(checks):
    lines = ["## Numerical checks (run before timing; the run stops if one fails)", "",
             "| check | max abs difference | tolerance |", "|---|---|---|"]
    lines += [f"| {what} | {diff:.1e} | {tol:.0e} |" for what, diff, tol in checks]
    return lines + [""]


def _target(lines, text, value, ok, fmt="{:.2f}x"):
    lines.append(f"| {text} | {fmt.format(value) if value is not None else 'not measured'} | "
                 f"{'met' if ok else 'MISSED' if value is not None else '-'} |")


def write_decode(out, header, checks, rows, constant, generate, profile):
    lines = _header("Decoding: softmax (kv cache) vs T2R (recurrent state) vs floor", header)
    lines += ["Per step: every sequence in the batch gets one new token through fairseq's incremental "
              "decoding, `model.decoder(tokens, incremental_state=state)`, after a prefix of L tokens. The "
              "prefix is read once at batch 1 (one parallel forward pass; each attention module fills its own "
              "kv cache or state) and copied to every row with the decoder's reorder_incremental_state, as beam "
              "search does; softmax attends over exactly L cached keys in every timed step. The three models "
              "take turns step by step. *floor*: the same model with attention mixing removed (q/k/v/out "
              "projections, FFN, output layer kept): no attention variant can beat it.", "",
              "What T2R adds to the floor per layer and step: the packed state [S | z] update (one addcmul_) "
              "and read (one matmul) of batch x heads x features x (head_dim + 1) float32 numbers (the "
              "T2R state column of the memory table, over all layers), read twice and written once per step, "
              "plus a handful of small kernels. What it saves: the feature map is folded into the "
              "projections, so its fused q/k/v matmul is smaller than the floor's q, k and v projections.",
              "", *_checks(checks)]
    t = {(r["length"], r["batch"], r["model"]): r for r in rows}
    lengths = sorted({r["length"] for r in rows})
    batches = sorted({r["batch"] for r in rows})
    if rows:
        lines += ["## Time per decode step", "",
                  "| batch | prefix L | softmax ms | T2R ms | floor ms | softmax / T2R | T2R / floor | "
                  "T2R(L) / T2R(shortest) | wall ms: softmax / T2R / floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in batches:
            for n in lengths:
                s, r, f = (t[(n, b, m)]["step_s"] for m in ("softmax", "t2r", "floor"))
                walls = " / ".join(f"{t[(n, b, m)]['wall_s'] * 1e3:.1f}" for m in ("softmax", "t2r", "floor"))
                lines.append(f"| {b} | {n} | {s * 1e3:.2f} | {r * 1e3:.2f} | {f * 1e3:.2f} | {s / r:.2f} | "
                             f"{r / f:.2f} | {r / t[(lengths[0], b, 't2r')]['step_s']:.2f} | {walls} |")
        lines += ["", "T2R(L) / T2R(shortest) would be 1.00 without noise (T2R's state has the same size at "
                  "every length): its spread shows how much the load of this shared machine moves the numbers "
                  "between configurations measured minutes apart. The next table measures it side by side.", ""]
    c = {(r["length"], r["batch"]): r for r in constant}
    if constant:
        c_lengths = sorted({r["length"] for r in constant})
        lines += ["## T2R after every prefix length, side by side", "",
                  "The T2R model alone, one state per prefix length, stepped in turn (one step after each prefix, "
                  "then again): only the prefix length differs.", "",
                  "| batch | " + " | ".join(f"L={n} ms" for n in c_lengths) + " | longest / shortest |",
                  "|---|" + "---|" * (len(c_lengths) + 1)]
        for b in sorted({r["batch"] for r in constant}):
            lines.append(f"| {b} | " + " | ".join(f"{c[(n, b)]['step_s'] * 1e3:.2f}" for n in c_lengths)
                         + f" | {c[(c_lengths[-1], b)]['step_s'] / c[(c_lengths[0], b)]['step_s']:.2f} |")
        lines.append("")
    if rows:
        lines += ["## Memory of decoding", "", MEMORY_NOTE, "",
                  "| batch | prefix L | softmax kv cache held | T2R state held | cache / state | "
                  "softmax peak in a step | T2R peak in a step | floor peak in a step |", "|---|---|---|---|---|---|---|---|"]
        for b in batches:
            for n in lengths:
                s, r, f = (t[(n, b, m)] for m in ("softmax", "t2r", "floor"))
                lines.append(f"| {b} | {n} | {human_bytes(s['state_bytes'])} | {human_bytes(r['state_bytes'])} | "
                             f"{s['state_bytes'] / r['state_bytes']:.0f} | {human_bytes(s['peak_bytes'])} | "
                             f"{human_bytes(r['peak_bytes'])} | {human_bytes(f['peak_bytes'])} |")
        lines += ["", "![decode step time](bench_decode.png)", ""]
        lines += _decode_targets(t, c, lengths, batches)
        _plot(out / "bench_decode.png", t, lengths, batches)
    if generate:
        g = {(r["model"], r["beam"]): r for r in generate}
        lines += ["## End to end: fairseq SequenceGenerator", "",
                  "Batch 1, one-token prompt, exactly the given number of tokens generated (min_len = max_len), "
                  "beam search reorders the incremental state every step. One run after a short warm-up run.", "",
                  "| beam | tokens | softmax s | T2R s | softmax / T2R | T2R tokens/s | wall s: softmax / T2R |",
                  "|---|---|---|---|---|---|---|"]
        for beam in sorted({r["beam"] for r in generate}):
            s, r = g[("softmax", beam)], g[("t2r", beam)]
            lines.append(f"| {beam} | {r['length']} | {s['seconds']:.2f} | {r['seconds']:.2f} | "
                         f"{s['seconds'] / r['seconds']:.2f} | {r['length'] / r['seconds']:.0f} | "
                         f"{s['wall']:.1f} / {r['wall']:.1f} |")
        lines.append("")
    if profile:
        lines += ["## Where a step's time goes (torch.profiler, self CPU time)", "", profile, ""]
    (out / "bench_decode.md").write_text("\n".join(lines))


def _decode_targets(t, c, lengths, batches):
    lines = ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    for b in batches:
        lo, hi = c.get((128, b)), c.get((8192, b))
        ratio = hi["step_s"] / lo["step_s"] if lo and hi else None
        _target(lines, f"T2R step at prefix 8192 within 1.10x of prefix 128, batch {b} (side by side)", ratio,
                ratio is not None and ratio <= 1.10)
        worst = max((t[(n, b, "t2r")]["step_s"] / t[(n, b, "floor")]["step_s"], n) for n in lengths)
        _target(lines, f"T2R within 1.15x of the floor at every length, batch {b} (worst: L={worst[1]})",
                worst[0], worst[0] <= 1.15)
    for n, b, goal in ((4096, 1, 4), (2048, 16, 10)):
        s, r = t.get((n, b, "softmax")), t.get((n, b, "t2r"))
        ratio = s["step_s"] / r["step_s"] if s and r else None
        _target(lines, f"T2R >= {goal}x faster than softmax at prefix {n}, batch {b}", ratio,
                ratio is not None and ratio >= goal)
    return lines + [""]


def _plot(path, t, lengths, batches):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    def log_axes(ax):
        ax.set(xscale="log", yscale="log")
        ax.set_xticks(lengths, [str(n) for n in lengths], rotation=45)
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)

    fig, axes = plt.subplots(1, len(batches) + 1, figsize=(5 * (len(batches) + 1), 4))
    for ax, b in zip(axes, batches):
        for m, style in (("softmax", "o-"), ("t2r", "s-"), ("floor", "^--")):
            ax.plot(lengths, [t[(n, b, m)]["step_s"] * 1e3 for n in lengths], style, label=m)
        log_axes(ax)
        ax.set(xlabel="prefix length", ylabel="ms per decode step (CPU time)", title=f"batch {b}")
        ax.legend()
    ax = axes[-1]
    for b in batches:
        ax.plot(lengths, [t[(n, b, "softmax")]["state_bytes"] / 2 ** 20 for n in lengths], "o-", label=f"softmax kv cache, batch {b}")
        ax.plot(lengths, [t[(n, b, "t2r")]["state_bytes"] / 2 ** 20 for n in lengths], "s-", label=f"T2R state, batch {b}")
    log_axes(ax)
    ax.set(xlabel="prefix length", ylabel="MiB held", title="decode state: kv cache vs T2R state")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def step_profile(models, length, batches, *, vocab, steps=20):
    """torch.profiler tables (self CPU time) of T2R and floor decode steps, per batch size."""
    from torch.profiler import ProfilerActivity, profile

    from .decode import _expand

    tokens = torch.randint(4, vocab, (1, length + 1))
    parts = []
    for batch, name in ((b, n) for b in batches for n in ("t2r", "floor")):
        model = models[name]
        with torch.no_grad():
            state = _expand(model, prefill(model, tokens[:, :min(length, 128)]), batch)
            step_tokens = tokens.expand(batch, -1).contiguous()
            model.decoder(step_tokens, incremental_state=state)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(steps):
                    model.decoder(step_tokens, incremental_state=state)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14)
        parts.append(f"{name}, batch {batch}, {steps} steps (T2R's step cost does not depend on the prefix):\n\n"
                     f"```\n{table}\n```")
    return "\n\n".join(parts)


def write_train(out, header, checks, rows):
    lines = _header("Training: forward + backward per token, T2R chunked vs softmax vs quadratic T2R", header)
    lines += ["Fixed tokens per step (batch = tokens / length). *layer*: one decoder layer (attention + FFN, "
              "fairseq's causal mask for softmax); *model*: the whole model with output layer and cross-entropy. "
              "*t2r*: the chunked parallel form (chunk 64); *t2r-naive*: the same module in one chunk as long as "
              "the sequence (the T x T form). softmax is fairseq's MultiheadAttention, which calls "
              "torch's F.multi_head_attention_forward. Median of interleaved rounds after a warm-up. "
              "Memory: peak torch tensor bytes allocated during one forward + backward (torch.profiler memory "
              "events; parameter gradients included, parameters not), per token.", "", *_checks(checks)]
    t = {(r["level"], r["length"], r["form"]): r for r in rows}
    for level in ("layer", "model"):
        lengths = sorted({r["length"] for r in rows if r["level"] == level})
        if not lengths:
            continue
        lines += [f"## {level}", "",
                  "| length | batch | softmax us/token | t2r us/token | t2r-naive us/token | softmax / t2r | "
                  "softmax / t2r (wall) | softmax KiB/token | t2r KiB/token | t2r-naive KiB/token |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for n in lengths:
            s, r, q = t[(level, n, "softmax")], t[(level, n, "t2r")], t.get((level, n, "t2r-naive"))
            naive_us = f"{q['token_s'] * 1e6:.1f}" if q else "skipped"
            naive_kib = f"{q['token_bytes'] / 1024:.1f}" if q else "skipped"
            lines.append(f"| {n} | {s['batch']} | {s['token_s'] * 1e6:.1f} | {r['token_s'] * 1e6:.1f} | {naive_us} | "
                         f"{s['token_s'] / r['token_s']:.2f} | {s['token_wall_s'] / r['token_wall_s']:.2f} | "
                         f"{s['token_bytes'] / 1024:.1f} | "
                         f"{r['token_bytes'] / 1024:.1f} | {naive_kib} |")
        lines.append("")
    lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
    for level in ("layer", "model"):
        for n, text, ok in ((4096, "chunked T2R >= 2x faster than softmax at 4096", lambda x: x >= 2),
                            (512, "chunked T2R <= 1.3x slower than softmax at 512", lambda x: x <= 1.3)):
            s, r = t.get((level, n, "softmax")), t.get((level, n, "t2r"))
            value = None if not (s and r) else (s["token_s"] / r["token_s"] if n == 4096 else r["token_s"] / s["token_s"])
            _target(lines, f"{text} ({level}; {'softmax / t2r' if n == 4096 else 't2r / softmax'})", value,
                    value is not None and ok(value))
    (out / "bench_train.md").write_text("\n".join(lines + [""]))


def write_memory(out, header, rows):
    """results of generation_memory.memory_rows: the RSS table, long/short ratios, the target."""
    from .generation_memory import __doc__ as method

    lines = _header("Generation memory: T2R (constant-size state) vs softmax (key/value cache)", header,
                    note=" ".join(method.split()))
    lines += ["| model | tokens generated | RSS before generating (baseline) | peak RSS while generating | "
              "increment (peak - baseline) | CPU s | wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['length']} | {human_bytes(r['baseline_bytes'])} | "
                     f"{human_bytes(r['peak_bytes'])} | {human_bytes(r['increment_bytes'])} | {r['seconds']:.1f} | "
                     f"{r['wall']:.1f} |")
    t = {(r["model"], r["length"]): r for r in rows}
    short, long = min(r["length"] for r in rows), max(r["length"] for r in rows)
    lines += ["", f"## {long} tokens vs {short}", "",
              "The baseline (Python, torch, fairseq and the model's weights) dominates the peak, so the increments "
              "are given too: they are what generation itself adds.", "",
              f"| model | peak({long}) / peak({short}) | increment({long}) / increment({short}) | "
              f"increment({long}) - increment({short}) |", "|---|---|---|---|"]
    for model in dict.fromkeys(r["model"] for r in rows):
        s, n = t[(model, short)], t[(model, long)]
        # An increment can be 0 (or a page negative): the generation then fit in pages already resident.
        ratio = (f"{n['increment_bytes'] / s['increment_bytes']:.2f}" if s["increment_bytes"] > 0
                 else f"- (no increment at {short})")
        lines.append(f"| {model} | {n['peak_bytes'] / s['peak_bytes']:.3f} | {ratio} | "
                     f"{human_bytes(n['increment_bytes'] - s['increment_bytes'])} |")
    growth = t[("t2r", long)]["peak_bytes"] / t[("t2r", short)]["peak_bytes"]
    lines += ["", "## Target", "", "| target | measured | |", "|---|---|---|"]
    _target(lines, f"T2R peak RSS generating {long} tokens grows < 5% over generating {short}",
            growth, growth < 1.05, fmt="{:.3f}x")
    (out / "generation_memory.md").write_text("\n".join(lines + [""]))
