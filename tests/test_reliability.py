"""Long runs on shared clusters: a SIGKILLed conversion run resumes and ends where an
uninterrupted one ends; 2-process training on fairseq's distributed engine matches 1 process
with --update-freq 2."""
import pathlib
import re
import signal
import socket
import subprocess
import sys

import torch

from helpers import BIN, MODEL, TRAIN, USER_DIR, run

# wiki103 defaults carry attention and activation dropout too. Any dropout breaks the
# 2-process == --update-freq 2 comparison: fairseq seeds every rank alike at each update, while
# one process draws the second micro-batch's masks from where the first left the generator.
NO_DROPOUT = [a if a != 0.1 else 0.0 for a in MODEL] + ["--attention-dropout", 0.0, "--activation-dropout", 0.0]


def _train_cmd(root, save, updates, extra=()):
    return [str(BIN / "fairseq-train"), str(root / "bin"), "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
            "--convert-from", str(root / "softmax/checkpoint_last.pt"), "--arch", "t2r_lm_wiki103",
            *map(str, NO_DROPOUT), *map(str, TRAIN), "--max-update", str(updates), "--save-dir", str(save),
            "--log-interval", "1", *map(str, extra)]


def _final_weights(save):
    return torch.load(save / "checkpoint_last.pt", weights_only=False)["model"]


def test_sigkill_then_rerun_resumes_and_matches_uninterrupted(lm_workdir):
    extra = ["--save-interval-updates", 4, "--disable-validation"]
    reference = lm_workdir / "uninterrupted"
    run(_train_cmd(lm_workdir, reference, 12, extra))

    # The same command, SIGKILLed by itself right after the checkpoint at update 4 is written.
    killed = lm_workdir / "killed"
    crashed = run([sys.executable, pathlib.Path(__file__).parent / "sigkill_after_checkpoint.py", 4,
                   *_train_cmd(lm_workdir, killed, 12, extra)[1:]], check=False)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-3000:]
    last = torch.load(killed / "checkpoint_last.pt", weights_only=False)
    assert last["optimizer_history"][-1]["num_updates"] == 4

    second = run(_train_cmd(lm_workdir, killed, 12, extra))
    log = second.stdout + second.stderr
    assert "skipping --convert-from" in log and "num_updates=12" in log.replace(" ", "")
    ref, resumed = _final_weights(reference), _final_weights(killed)
    for name in ref:
        torch.testing.assert_close(resumed[name], ref[name], rtol=1e-4, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(text):
    return [float(x) for x in re.findall(r"train_inner \|.*? loss=([0-9.]+)", text)]


def test_two_process_gloo_training_matches_update_freq_two(lm_workdir):
    common = ["--disable-validation", "--no-save"]
    single = run(_train_cmd(lm_workdir, lm_workdir / "single", 4, common + ["--update-freq", 2]))
    port = _free_port()
    procs = [subprocess.Popen(_train_cmd(lm_workdir, lm_workdir / "ddp", 4, common + [
        "--distributed-init-method", f"tcp://127.0.0.1:{port}", "--distributed-world-size", 2,
        "--distributed-rank", rank, "--distributed-no-spawn", "--distributed-backend", "gloo"]),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs[0][-3000:]
    expected, got = _losses(single.stdout + single.stderr), _losses(outputs[0])
    assert len(expected) == 4 and len(got) == 4, (expected, got)
    for a, b in zip(expected, got):
        assert abs(a - b) < 2e-3, (expected, got)
