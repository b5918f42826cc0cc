"""Swap-then-finetune on WikiText-2 at CPU scale: the paper's language-modelling claims.

    python -m examples.language_model.wikitext2 --data ../shared/data/wikitext-2

Rows: a softmax teacher; T2R / ELU / RFA converted from it and finetuned for a quarter of the
teacher's updates; T2R from random init for the same number of updates and for as many as the
teacher; the teacher trained on for the finetuning budget (the fair baseline); and, beyond the
paper, attention transfer, a hybrid, Hedgehog and Performer maps; and for long context, decay on
the state (learned, gated) and the gated model trained with its state carried across batches
(`--task t2r_truncated_bptt_lm`); and a sliding softmax window inside each layer (`--t2r-window 64`,
plain and with attention transfer). Each row's dev/test perplexity comes from fairseq-eval-lm
(`--context-window`); every all-recurrent row is also scored with its state carried across the
whole test split (`fairseq-eval-lm --task t2r_truncated_bptt_lm`, `test_ppl_carried`). Results accumulate in results/wikitext2.json after every row, so an interrupted run continues where it stopped
(`--force ROW` reruns one).

Perplexity by distance from the start of a stream (DISTANCE_BUCKETS): every carried evaluation
records it (`test_ppl_by_distance_carried`); `--by-distance` also records the windowed scores of the
chosen rows by the same buckets (`test_ppl_by_distance`: the 8 streams of the carried evaluation,
each windowed token placed where it stands in them), and fills both for recorded rows that lack them.

Why this teacher: `transformer_lm` on an 8k sentencepiece BPE vocabulary. The word vocabulary
(33k) makes the output layer dominate CPU time; BPE keeps a 2-core run within budget and makes
every perplexity here per BPE token (comparable across rows, not with word-level numbers).
"""
import argparse
import datetime
import math
import pathlib
import re
import sys
import time
from typing import NamedTuple, Tuple

from tools import kit
from tools.kit import log

ROOT = pathlib.Path(__file__).resolve().parents[2]

USER_DIR = str(ROOT / "t2r_fairseq")

# Sized for a shared 2-core CPU: about 1-2k tokens/s per training process.
MODEL = ["--decoder-layers", "2", "--decoder-embed-dim", "128", "--decoder-ffn-embed-dim", "512",
         "--decoder-attention-heads", "2", "--share-decoder-input-output-embed", "--dropout", "0.1"]


def train_args(tokens_per_sample, max_tokens, lr, warmup, streams=False):
    # The stream task reads max_tokens // tokens_per_sample streams side by side: the same tokens per update.
    batching = (["--batch-size", str(max_tokens // tokens_per_sample)] if streams
                else ["--sample-break-mode", "none", "--max-tokens", str(max_tokens)])
    return ["--tokens-per-sample", str(tokens_per_sample), *batching, "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)",
            "--clip-norm", "1.0", "--lr", str(lr), "--lr-scheduler", "inverse_sqrt", "--warmup-updates",
            str(warmup), "--weight-decay", "0.01", "--cpu", "--num-workers", "0", "--log-format", "simple",
            "--log-interval", "50", "--no-epoch-checkpoints", "--seed", "1"]


def prepare(data, work, vocab):
    bin_dir = work / "bin"
    if (bin_dir / "dict.txt").exists():
        return bin_dir
    spm_dir = work / "spm"
    spm_dir.mkdir(parents=True, exist_ok=True)
    log(f"sentencepiece BPE ({vocab}) on {data / 'wiki.train.tokens'}")
    model = kit.learn_bpe(data / "wiki.train.tokens", spm_dir / "spm", vocab)
    for split in ("train", "valid", "test"):
        # WikiText's blank lines carry no text: drop them, as fairseq-preprocess would keep them as lone </s>.
        nonblank = spm_dir / f"{split}.raw"
        nonblank.write_text("".join(line for line in (data / f"wiki.{split}.tokens").open(encoding="utf-8")
                                    if line.strip()), encoding="utf-8")
        kit.encode_bpe(model, nonblank, spm_dir / f"{split}.bpe")
    log("fairseq-preprocess")
    kit.run_or_exit(["fairseq-preprocess", "--only-source", "--trainpref", spm_dir / "train.bpe", "--validpref",
                     spm_dir / "valid.bpe", "--testpref", spm_dir / "test.bpe", "--destdir", bin_dir, "--workers", "2"],
                    work / "logs/preprocess.log")
    return bin_dir


# Perplexity by distance from the start of a stream: bucket edges, in tokens (0-128, 128-512, 512-2048, 2048+).
DISTANCE_BUCKETS = (128, 512, 2048)
CARRIED_STREAMS = 8  # evaluate_carried's --batch-size: the test split as 8 streams side by side


def evaluate_windowed(bin_dir, checkpoint, tokens_per_sample, subset, log_path, *extra):
    """fairseq-eval-lm's output, every token scored with a window of tokens_per_sample // 2 tokens before it."""
    return kit.run_or_exit(["fairseq-eval-lm", bin_dir, "--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset",
                            subset, "--tokens-per-sample", str(tokens_per_sample), "--context-window",
                            str(tokens_per_sample // 2), "--max-tokens", "8192", "--required-batch-size-multiple", "1",
                            "--cpu", *extra], log_path)


def evaluate(bin_dir, checkpoint, tokens_per_sample, subset, log_path):
    return kit.perplexity(evaluate_windowed(bin_dir, checkpoint, tokens_per_sample, subset, log_path))


def evaluate_carried(bin_dir, checkpoint, tokens_per_sample, log_path):
    """Test perplexity with every token seeing its whole history: fairseq-eval-lm with the stream
    task, the recurrent state carried from block to block (versus the 128-token window of `evaluate`);
    and {bucket: perplexity} by distance from the stream start."""
    text = kit.run_or_exit(["fairseq-eval-lm", bin_dir, "--user-dir", USER_DIR, "--path", checkpoint,
                            "--task", "t2r_truncated_bptt_lm", "--tokens-per-sample", str(tokens_per_sample),
                            "--batch-size", str(CARRIED_STREAMS), "--gen-subset", "test", "--cpu",
                            "--distance-buckets", ",".join(map(str, DISTANCE_BUCKETS))], log_path)
    ppl, buckets = kit.perplexity(text), {}
    line = re.findall(r"Perplexity by distance from the stream start: (.*)", text)[-1]
    for label, value, n in re.findall(r"(\S+) (\S+) \(n=([0-9,]+)\)", line):
        if n != "0":
            buckets[label] = (float(value), int(n.replace(",", "")))
    _same_perplexity(ppl, buckets, log_path)
    return ppl, {label: value for label, (value, _) in buckets.items()}


def _same_perplexity(ppl, buckets, log_path):
    """The buckets, token-weighted, must give the overall perplexity back (a wrong mapping would not)."""
    total = sum(n for _, n in buckets.values())
    again = math.exp(sum(n * math.log(value) for value, n in buckets.values()) / total)
    if abs(again - ppl) > 0.01 + 1e-4 * ppl:  # the buckets' perplexities are printed to 0.01
        sys.exit(f"error: perplexity by distance gives {again:.4f} overall, fairseq-eval-lm {ppl}; see {log_path}")


def distance_labels(edges=DISTANCE_BUCKETS):
    """As `--distance-buckets` names them: 0-128, 128-512, 512-2048, 2048+."""
    bounds = (0, *edges)
    return [f"{a}-{b}" for a, b in zip(bounds, bounds[1:])] + [f"{edges[-1]}+"]


def word_probs(text):
    """(token, natural-log probability) of each token that fairseq-eval-lm --output-word-probs scored (no
    --post-process: one "word" per token), in split order: its lines are `ID token [score]\t...`, ID the
    block of the split and the tokens that block's targets (context-window targets are padding, not printed)."""
    blocks = {}
    # fairseq's log format, or Python's default where something configured logging first.
    for block, words in re.findall(r"fairseq_cli\.eval_lm(?: \| |:)(\d+) (.+)$", text, flags=re.M):
        blocks[int(block)] = [(token, float(score.rstrip("]")))
                              for token, score in (word.rsplit(" [", 1) for word in words.split("\t"))]
    return [word for block in sorted(blocks) for word in blocks[block]]


def stream_distances(n, streams=CARRIED_STREAMS):
    """Each token's distance from the start of its stream when t2r_truncated_bptt_lm reads a split of n tokens
    as `streams` streams (its StreamBatches): pieces of ceil(n / streams) tokens, the split's first token at 0."""
    length = math.ceil(n / streams)
    return [g % length for g in range(n)]


def windowed_by_distance(scores, streams=CARRIED_STREAMS, edges=DISTANCE_BUCKETS):
    """{bucket: (perplexity, tokens)} of per-token log-probabilities in split order, by stream_distances."""
    labels = distance_labels(edges)
    sums = {label: [0.0, 0] for label in labels}
    for score, distance in zip(scores, stream_distances(len(scores), streams)):
        bucket = sums[labels[sum(distance >= e for e in edges)]]
        bucket[0] -= score
        bucket[1] += 1
    return {label: (math.exp(nll / n), n) for label, (nll, n) in sums.items() if n}


def evaluate_by_distance(bin_dir, checkpoint, tokens_per_sample, log_path):
    """Windowed test perplexity ({bucket: perplexity}) by distance from the start of the carried evaluation's streams."""
    text = evaluate_windowed(bin_dir, checkpoint, tokens_per_sample, "test", log_path, "--output-word-probs")
    scores = [score for _, score in word_probs(text)]
    evaluated = int(re.findall(r"Evaluated ([0-9,]+) tokens", text)[-1].replace(",", ""))
    if len(scores) != evaluated:
        sys.exit(f"error: {len(scores)} word probabilities for {evaluated} evaluated tokens in {log_path}")
    buckets = windowed_by_distance(scores)
    _same_perplexity(kit.perplexity(text), buckets, log_path)
    return {label: round(value, 2) for label, (value, _) in buckets.items()}


def adopted_progress(checkpoint, train_log):
    """(updates, minutes) of a checkpoint saved during a run: its update count, and the run's
    wall clock at that update from fairseq's own log."""
    import torch

    updates = torch.load(checkpoint, map_location="cpu", weights_only=False)["optimizer_history"][-1]["num_updates"]
    walls = [float(w) for n, w in re.findall(r"num_updates=(\d+),.*?, wall=(\d+)", train_log.read_text())
             if int(n) <= updates]
    return updates, (walls[-1] / 60 if walls else float("nan"))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m examples.language_model.wikitext2",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=pathlib.Path, default=ROOT.parent / "shared/data/wikitext-2")
    p.add_argument("--work", type=pathlib.Path, default=ROOT / "runs/wikitext2")
    p.add_argument("--results", type=pathlib.Path, default=ROOT / "results/wikitext2.json")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--teacher-updates", type=int, default=1200)
    p.add_argument("--finetune-fraction", type=float, default=0.25)
    p.add_argument("--tokens-per-sample", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--feature-dim", type=int, default=32)
    p.add_argument("--carried-decay", default="gated", choices=("none", "fixed", "learned", "gated"),
                   help="--t2r-decay of the t2r_carried row")
    p.add_argument("--note", default=None, help="recorded in setup.notes (e.g. why a run was stopped early)")
    p.add_argument("--rows", default=None, help="comma-separated subset of rows to run")
    p.add_argument("--force", default="", help="comma-separated rows to rerun even if recorded")
    p.add_argument("--by-distance", action="store_true",
                   help="also record the windowed test perplexity by distance from the stream start "
                        "(test_ppl_by_distance) for the chosen rows, and fill it and the carried one "
                        "(test_ppl_by_distance_carried) for recorded rows that lack them")
    p.add_argument("--adopt", action="append", default=[], metavar="ROW=CHECKPOINT",
                   help="record ROW from a checkpoint its training run saved (e.g. an interval checkpoint of a "
                        "run stopped early) instead of training; updates and minutes are read from it and its log")
    args = p.parse_args(argv)
    for split in ("train", "valid", "test"):
        if not (args.data / f"wiki.{split}.tokens").is_file():
            sys.exit(f"error: {args.data} has no wiki.{split}.tokens (pass --data DIR with WikiText-2)")
    return args


class Carried(NamedTuple):
    """A row's second stage: its last `updates` updates read contiguous streams with the state carried
    across batches (`--task t2r_truncated_bptt_lm`), continuing the first stage's run (Adam's moments,
    the learning-rate schedule and the update count are restored, not restarted); `extra` (e.g.
    more streams of shorter blocks at the same tokens per update) is added to its options."""
    updates: int
    extra: Tuple[str, ...] = ()


def option(options, flag, default):
    """The value given to `flag` in a row's fairseq options, or `default`."""
    return next((options[i + 1] for i, a in enumerate(options) if a == flag), default)


def row_options(args, teacher_ckpt):
    """name: (fairseq-train options, updates, learning rate[, Carried second stage])."""
    n_teacher = args.teacher_updates
    n_finetune = max(1, int(n_teacher * args.finetune_fraction))
    tps, mt = args.tokens_per_sample, args.max_tokens
    t2r = ["--user-dir", USER_DIR, "--task", "t2r_language_modeling", "--arch", "t2r_lm",
           "--t2r-feature-dim", str(args.feature_dim)]
    t2r_streams = [a if a != "t2r_language_modeling" else "t2r_truncated_bptt_lm" for a in t2r]
    convert = ["--convert-from", teacher_ckpt]
    gated_delta = t2r + convert + ["--t2r-update", "delta", "--t2r-decay", "gated"]  # Gated DeltaNet
    softmax_on = ["--task", "language_modeling", "--arch", "transformer_lm", "--finetune-from-model", teacher_ckpt]
    return {
        "teacher": (["--task", "language_modeling", "--arch", "transformer_lm"], n_teacher, args.lr),
        "t2r_pretrain": (t2r + convert, n_finetune, args.finetune_lr),
        "elu_pretrain": (t2r + convert + ["--t2r-feature-map", "elu"], n_finetune, args.finetune_lr),
        "rfa_pretrain": (t2r + convert + ["--t2r-feature-map", "rfa"], n_finetune, args.finetune_lr),
        "t2r_random": (t2r, n_finetune, args.lr),
        # Beyond the paper (same finetuning budget): attention transfer (a third of the budget
        # on feature maps alone), a hybrid keeping the top layer softmax, newer feature maps.
        "t2r_transfer": (t2r + convert + ["--criterion", "t2r_attention_transfer", "--attention-transfer-only-updates",
                                          str(max(1, n_finetune // 3))], n_finetune, args.finetune_lr),
        # The same term from the first update, no feature-map-only stage.
        "t2r_transfer_joint": (t2r + convert + ["--criterion", "t2r_attention_transfer"], n_finetune, args.finetune_lr),
        "hybrid_50": (t2r + convert + ["--t2r-softmax-layers", "1"], n_finetune, args.finetune_lr),
        "hedgehog_pretrain": (t2r + convert + ["--t2r-feature-map", "hedgehog"], n_finetune, args.finetune_lr),
        "performer_pretrain": (t2r + convert + ["--t2r-feature-map", "performer"], n_finetune, args.finetune_lr),
        "t2r_random_full": (t2r, n_teacher, args.lr),
        # Long context: decay on the state (a learned constant per head, or a gate computed from
        # each position's input), then the gated model trained with its state carried across
        # batches of contiguous streams (truncated backpropagation through time).
        "t2r_decay_learned": (t2r + convert + ["--t2r-decay", "learned"], n_finetune, args.finetune_lr),
        "t2r_decay_gated": (t2r + convert + ["--t2r-decay", "gated"], n_finetune, args.finetune_lr),
        "t2r_carried": (t2r_streams + convert + ["--t2r-decay", args.carried_decay], n_finetune, args.finetune_lr),
        # Exact softmax over the last 64 positions and linear attention for older ones, in one layer
        # (LoLCATs-style); with the attention-transfer term from the first update, the best
        # distillation at this budget.
        "t2r_window": (t2r + convert + ["--t2r-window", "64"], n_finetune, args.finetune_lr),
        "t2r_window_transfer": (t2r + convert + ["--t2r-window", "64", "--criterion", "t2r_attention_transfer"],
                                n_finetune, args.finetune_lr),
        # Window and decay composed: the window keeps recent context exact, the gate lets the
        # state forget, so that scoring with the whole history (state carried) stays good.
        "t2r_window_gated": (t2r + convert + ["--t2r-window", "64", "--t2r-decay", "gated"], n_finetune,
                             args.finetune_lr),
        # The window with both distillation targets: the teacher's attention outputs and its
        # next-token distribution (KL, weight 0.5).
        "t2r_window_distill": (t2r + convert + ["--t2r-window", "64", "--criterion", "t2r_attention_transfer",
                                                "--distill-kl-weight", "0.5"], n_finetune, args.finetune_lr),
        # A state that can overwrite (delta_rule.py): DeltaNet and Gated DeltaNet, read out through
        # T2R's normaliser; and, to decide the read-out, Gated DeltaNet with DeltaNet's own (delta_norm).
        "t2r_delta": (t2r + convert + ["--t2r-update", "delta"], n_finetune, args.finetune_lr),
        "t2r_gated_delta": (gated_delta, n_finetune, args.finetune_lr),
        # Gated DeltaNet whose gates start remembering 8x longer (2048 tokens in its first head).
        "t2r_gated_delta_long": (gated_delta + ["--t2r-decay-memory", "2048"], n_finetune, args.finetune_lr),
        "t2r_gated_delta_norm": (t2r + convert + ["--t2r-update", "delta_norm", "--t2r-decay", "gated"], n_finetune,
                                 args.finetune_lr),
        # Carried state that pays off: independent blocks first, then the same run goes on with its
        # state carried across the batches of contiguous streams (a third of the budget).
        "t2r_gated_then_carried": (t2r + convert + ["--t2r-decay", "gated"], n_finetune, args.finetune_lr,
                                   Carried(max(1, n_finetune // 3))),
        # ... its levers, one at a time: twice the streams of half the length in the carried stage (the
        # same tokens per update, more diverse), gates that start remembering 8x longer, the delta rule.
        "t2r_gated_then_carried16": (t2r + convert + ["--t2r-decay", "gated"], n_finetune, args.finetune_lr,
                                     Carried(max(1, n_finetune // 3), ("--tokens-per-sample", str(tps // 2),
                                                                       "--batch-size", str(2 * mt // tps)))),
        "t2r_gated_long_then_carried": (t2r + convert + ["--t2r-decay", "gated", "--t2r-decay-memory", "2048"],
                                        n_finetune, args.finetune_lr, Carried(max(1, n_finetune // 3))),
        "t2r_gated_delta_then_carried": (gated_delta, n_finetune, args.finetune_lr, Carried(max(1, n_finetune // 3))),
        # Carried state learned without streams: every training block first reads up to 4 blocks of the
        # text before it into its state (no gradients; the batches stay shuffled blocks).
        "t2r_gated_delta_history": (gated_delta + ["--history-blocks", "4"], n_finetune, args.finetune_lr),
        "t2r_gated_history": (t2r + convert + ["--t2r-decay", "gated", "--history-blocks", "4"], n_finetune,
                              args.finetune_lr),
        # ... its levers: more history (up to 2048 and 4096 tokens), and gates that start remembering 8x longer.
        "t2r_gated_delta_history8": (gated_delta + ["--history-blocks", "8"], n_finetune, args.finetune_lr),
        "t2r_gated_delta_history16": (gated_delta + ["--history-blocks", "16"], n_finetune, args.finetune_lr),
        "t2r_gated_delta_long_history": (gated_delta + ["--t2r-decay-memory", "2048", "--history-blocks", "4"],
                                         n_finetune, args.finetune_lr),
        # The fair baseline for an undertrained teacher: the softmax model trained on for the
        # same finetuning budget (every converted row also keeps learning the task).
        "teacher_continued": (softmax_on, n_finetune, args.finetune_lr),
        # Twice the finetuning budget, and its own bar: does more training teach the history's use?
        "t2r_gated_delta_history_2x": (gated_delta + ["--history-blocks", "8"], 2 * n_finetune, args.finetune_lr),
        # The same with another seed (initial feature maps, dropout, batch order): is the gain that seed's?
        "t2r_gated_delta_history_2x_seed2": (gated_delta + ["--history-blocks", "8", "--seed", "2"], 2 * n_finetune,
                                             args.finetune_lr),
        "teacher_continued_2x": (softmax_on, 2 * n_finetune, args.finetune_lr),
    }


def main(argv=None):
    args = parse_args(argv)
    store = kit.Results(args.results)
    bin_dir = prepare(args.data, args.work, args.vocab)
    tps, mt = args.tokens_per_sample, args.max_tokens
    rows = row_options(args, args.work / "teacher/checkpoint_last.pt")
    adopted = dict(a.split("=", 1) for a in args.adopt)
    wanted = args.rows.split(",") if args.rows else list(rows)

    def run_row(name):
        extra, updates, lr, *stages = rows[name]
        carried = stages[0] if stages else None
        if name in adopted:
            checkpoint = pathlib.Path(adopted[name])
            updates, minutes = adopted_progress(checkpoint, args.work / f"logs/{name}.train.log")
            log(f"{name}: adopting {checkpoint} ({updates} updates, {minutes:.1f} min of training)")
        else:
            checkpoint = args.work / name / "checkpoint_last.pt"
            log(f"{name}: fairseq-train, {updates} updates")
            warmup = min(400, max(1, updates // 10))
            # Validation on a slice of valid only traces the curve; the reported numbers come from
            # fairseq-eval-lm on the full splits.
            streams = "t2r_truncated_bptt_lm" in extra
            schedule = ["--validate-interval-updates", str(max(1, updates // 4)), "--max-valid-steps", "25",
                        "--save-interval-updates", str(max(1, updates // 6)), "--keep-interval-updates", "1"]
            first = updates - (carried.updates if carried else 0)
            _, minutes = kit.train_fresh(
                # The row's own options last: they win over the recipe's defaults (e.g. another --seed).
                [bin_dir, *MODEL, *train_args(tps, mt, lr, warmup, streams), *extra, "--max-update", str(first),
                 *schedule], args.work / name, args.work / f"logs/{name}.train.log")
            if carried:
                log(f"{name}: the same run goes on for {carried.updates} updates with its state carried")
                stream_extra = [a if a != "t2r_language_modeling" else "t2r_truncated_bptt_lm" for a in extra]
                start = time.time()
                # fairseq resumes from the save dir's checkpoint_last.pt (--convert-from is then ignored);
                # --reset-dataloader: the first stage's position in its own batches means nothing here.
                kit.run_or_exit(["fairseq-train", bin_dir, *MODEL, *stream_extra,
                                 *train_args(tps, mt, lr, warmup, streams=True), *carried.extra,
                                 "--max-update", str(updates), *schedule, "--reset-dataloader",
                                 "--save-dir", args.work / name], args.work / f"logs/{name}.carried.train.log")
                minutes += (time.time() - start) / 60
        row = {"updates": updates, "minutes": round(minutes, 1)}
        for subset in ("valid", "test"):
            row[f"{subset}_ppl"] = round(evaluate(bin_dir, checkpoint, tps, subset,
                                                  args.work / f"logs/{name}.eval_{subset}.log"), 2)
        if USER_DIR in extra:  # a T2R row
            row["feature_map"] = option(extra, "--t2r-feature-map", "t2r")
            row["feature_dim"] = args.feature_dim
            row["decay"] = option(extra, "--t2r-decay", "none")
            row["update"] = option(extra, "--t2r-update", "add")
            row["carried_state_training"] = "t2r_truncated_bptt_lm" in extra or carried is not None
            row["history_blocks"] = int(option(extra, "--history-blocks", 0))
            if carried:
                row["carried_updates"] = carried.updates
                row["carried_options"] = " ".join(carried.extra)
            row["window"] = int(option(extra, "--t2r-window", 0))
        if name != "teacher":
            row["init"] = "teacher" if {"--convert-from", "--finetune-from-model"} & set(extra) else "random"
        return row

    def setup():
        return {
            "commands": f"python -m examples.language_model.wikitext2 --data {args.data} "
                        + " ".join(a for a in (argv or sys.argv[1:]) if not a.startswith("--data")),
            "teacher": "transformer_lm " + " ".join(MODEL) + f", sentencepiece BPE {args.vocab}, "
                       f"tokens_per_sample {tps}, max_tokens {mt}",
            "eval": f"fairseq-eval-lm --tokens-per-sample {tps} --context-window {tps // 2} (per BPE token)",
            "machine": kit.machine(),
            "date": datetime.date.today().isoformat(),
            **({"notes": args.note} if args.note else {}),
        }

    store.run_rows(wanted, rows, set(filter(None, args.force.split(","))), run_row, setup)
    # Unbounded-context scoring applies to rows whose every layer is recurrent.
    for name, (extra, _, _, *stages) in rows.items():
        # Blocks as long as the carried stage's (a model trained on shorter ones has fewer positions).
        block = int(option(stages[0].extra, "--tokens-per-sample", tps)) if stages else tps
        row = store.load().get(name)
        if name not in wanted or row is None:
            continue
        recurrent = USER_DIR in extra and "--t2r-softmax-layers" not in extra
        carried = recurrent and ("test_ppl_carried" not in row
                                 or args.by_distance and "test_ppl_by_distance_carried" not in row)
        windowed = args.by_distance and "test_ppl_by_distance" not in row
        checkpoint = pathlib.Path(adopted.get(name, args.work / name / "checkpoint_last.pt"))
        if (carried or windowed) and not checkpoint.is_file():
            log(f"{name}: no {checkpoint} to score (state carried, or by distance from the stream start); skipped")
            continue
        if carried:
            ppl, by_distance = evaluate_carried(bin_dir, checkpoint, block, args.work / f"logs/{name}.eval_carried.log")
            ppl = round(ppl, 2)
            log(f"{name}: test perplexity {ppl} with the state carried across the whole split; by distance from "
                f"the stream start {by_distance}")
            if row.get("test_ppl_carried", ppl) != ppl:
                log(f"{name}: recorded test_ppl_carried {row['test_ppl_carried']} kept; this evaluation gave {ppl}")
            store.update(name, test_ppl_carried=row.get("test_ppl_carried", ppl),
                         test_ppl_by_distance_carried=by_distance)
        if windowed:
            by_distance = evaluate_by_distance(bin_dir, checkpoint, tps, args.work / f"logs/{name}.eval_words.log")
            log(f"{name}: windowed test perplexity by distance from the stream start {by_distance}")
            store.update(name, test_ppl_by_distance=by_distance)
    log(f"results in {args.results}")


if __name__ == "__main__":
    main()
