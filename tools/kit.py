"""The floor that examples/, benchmarks/ and docs/ stand on (it imports nothing of theirs): running a
command with a log, reading fairseq's perplexity, sentencepiece BPE, the machine and its load, how
bytes and durations are printed, and a results file that rows are recorded into as they finish (so
long experiments resume where they stopped)."""
import json
import os
import pathlib
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time

BIN = pathlib.Path(sys.executable).parent
# Timings taken next to other work are off by up to 5x on a 2-core machine: above this 1-minute
# load average, measurements warn.
BUSY_LOAD = 1.0


def log(msg):
    """A progress line, time-stamped."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def minutes(seconds: float) -> str:
    """m:ss"""
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"


class CommandFailed(RuntimeError):
    """A command exited non-zero: the one-line message names it, its exit code and its log;
    `tail` holds the output's last lines."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def run_logged(cmd, log_path, on_line=None) -> str:
    """Run a command (console scripts from this environment first) with its output streamed to
    log_path, the command line on top (copy-paste to rerun). Returns the output; raises
    CommandFailed with the output's last lines on failure."""
    cmd = [str(c) for c in cmd]
    if (BIN / cmd[0]).exists():
        cmd[0] = str(BIN / cmd[0])
    log_path = pathlib.Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    with open(log_path, "w", buffering=1) as log:  # line-buffered: `tail -f` shows progress as it happens
        log.write(shlex.join(cmd) + "\n\n")
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                    env=dict(os.environ, PYTHONUNBUFFERED="1"))
        except OSError as e:
            raise CommandFailed(f"cannot run {cmd[0]}: {e.strerror} (is the environment installed? "
                                f"`make install`)") from None
        for line in proc.stdout:  # streamed, so callers can report progress as it happens
            log.write(line)
            lines.append(line)
            if on_line is not None:
                on_line(line)
        proc.wait()
    if proc.returncode != 0:
        raise CommandFailed(f"{pathlib.Path(cmd[0]).name} failed with exit code {proc.returncode}; "
                            f"full log: {log_path}", tail="".join(lines[-15:]))
    return "".join(lines)


def run_or_exit(cmd, log_path) -> str:
    """run_logged for scripts: on failure, exit with the one-line error and the output's tail."""
    try:
        return run_logged(cmd, log_path)
    except CommandFailed as e:
        sys.exit(f"error: {e}\n{e.tail}")


def train_fresh(cmd, save_dir, log_path, run=run_or_exit):
    """fairseq-train `cmd` (the arguments after the command name) into save_dir as a new run: the
    checkpoints an earlier run left there are removed first, or fairseq would resume from them.
    `run(cmd, log_path)` runs it. Returns (output, minutes of wall clock)."""
    for old in pathlib.Path(save_dir).glob("checkpoint*.pt"):
        old.unlink()
    start = time.time()
    text = run(["fairseq-train", *cmd, "--save-dir", save_dir], log_path)
    return text, (time.time() - start) / 60


def perplexity(text: str) -> float:
    """The last "Perplexity: X" that fairseq-eval-lm printed; inf and nan
    included, since a diverged model prints them."""
    found = re.findall(r"Perplexity: ([0-9.]+|inf|nan)", text)
    if not found:
        raise ValueError("no 'Perplexity:' line in the output")
    return float(found[-1])


def learn_bpe(train_path, model_prefix, vocab_size, **options) -> pathlib.Path:
    """A sentencepiece BPE model learned on train_path; returns the .model path. fairseq-preprocess
    builds its own dictionary (with its own <unk>, <s>, </s>, <pad>), so only unk is kept here."""
    import sentencepiece as spm

    settings = dict(model_type="bpe", character_coverage=1.0, input_sentence_size=2_000_000,
                    shuffle_input_sentence=True, bos_id=-1, eos_id=-1, unk_id=0, pad_id=-1, num_threads=2,
                    minloglevel=2)
    settings.update(options)
    spm.SentencePieceTrainer.train(input=str(train_path), model_prefix=str(model_prefix), vocab_size=vocab_size,
                                   **settings)
    return pathlib.Path(f"{model_prefix}.model")


def encode_bpe(model_path, raw_path, out_path, limit=None) -> int:
    """raw_path as space-separated BPE pieces, a line per line (the first `limit` lines);
    returns the number of tokens fairseq will see (pieces + one end-of-sentence per line)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    count = 0
    with open(raw_path, encoding="utf-8", errors="replace") as src, open(out_path, "w", encoding="utf-8") as out:
        for index, line in enumerate(src):
            if limit is not None and index >= limit:
                break
            pieces = sp.encode(line.strip(), out_type=str)
            count += len(pieces) + 1
            out.write(" ".join(pieces) + "\n")
    return count


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def load_average() -> float:
    """The 1-minute load average."""
    return os.getloadavg()[0]


def machine() -> dict:
    """What to record beside every measurement."""
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def busy_warning(what: str):
    """A loud warning (None when idle) when other work runs: timings would be off."""
    load = load_average()
    if load <= BUSY_LOAD:
        return None
    bar = "!" * 78
    return (f"{bar}\nWARNING: 1-minute load average {load:.2f} > {BUSY_LOAD}: other work is running, so {what} "
            f"will be off (up to 5x seen on 2 cores).\nStop other jobs and rerun for numbers worth publishing.\n{bar}")


class Results:
    """A JSON file of named rows, written as each row ends: a rerun skips recorded rows, and an
    interrupted run loses only the row in progress. Every write re-reads the file first (rows may be
    recorded by parallel processes) and replaces it atomically."""

    def __init__(self, path):
        self.path = pathlib.Path(path)

    def load(self) -> dict:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, name: str, row: dict):
        results = self.load()
        results[name] = row
        self.write(results)

    def update(self, name: str, **fields):
        results = self.load()
        results[name].update(fields)
        self.write(results)

    def run_rows(self, names, known, force, run_row, setup):
        """Compute each row of `names` with run_row(name) and record it as it ends, with setup() (how the
        rows were made) merged into the "setup" row (fields other tools recorded there, such as a decode
        pass's, stay); rows recorded already are skipped unless in `force`."""
        for name in names:
            if name not in known:
                sys.exit(f"error: unknown row {name!r}; rows are {', '.join(known)}")
            if name in self.load() and name not in force:
                log(f"{name}: recorded already (--force {name} reruns it)")
                continue
            row = run_row(name)
            log(f"{name}: {row}")
            self.record(name, row)
            self.record("setup", {**self.load().get("setup", {}), **setup()})

    def write(self, results: dict):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(results, f, indent=2, allow_nan=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.path)

