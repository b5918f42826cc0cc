"""The user's workflow through fairseq's own CLIs: a transformer_lm_wiki103-shaped softmax
checkpoint (small dims, adaptive input/softmax) converts, finetunes under fairseq-train, resumes,
and is scored by fairseq-eval-lm; the offline converter's output loads under fairseq too."""
import re

import torch

from helpers import MODEL, TRAIN, USER_DIR, conversion_log, converter_log, run

NEW = {f"decoder.layers.{i}.self_attn.feature_map.{p}" for i in range(2) for p in ("weight", "bias")}


def _perplexity(output: str) -> float:
    found = re.findall(r"Perplexity: ([0-9.]+)", output)
    assert found, output[-2000:]
    return float(found[-1])


def _finetune(root, save_dir, updates, extra=()):
    return run(["fairseq-train", root / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
                "--convert-from", root / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL, *TRAIN,
                "--max-update", updates, "--save-dir", save_dir, "--validate-interval-updates", 5, *extra])


def test_convert_finetune_eval(lm_workdir):
    out = _finetune(lm_workdir, lm_workdir / "t2r", 10)
    ppl = _perplexity(run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path",
                           lm_workdir / "t2r/checkpoint_last.pt", "--tokens-per-sample", 64, "--cpu"]).stderr)
    assert 1.0 < ppl < 1e5
    # The finetuned checkpoint is a T2R model: the teacher's tensors, and the feature maps that the
    # conversion logged as its only new ones.
    state = torch.load(lm_workdir / "t2r/checkpoint_last.pt", weights_only=False)["model"]
    teacher = torch.load(lm_workdir / "softmax/checkpoint_last.pt", weights_only=False)["model"]
    reused, new = conversion_log(out.stdout + out.stderr)
    assert new == NEW == set(state) - set(teacher) and reused + len(new) == len(state)


def test_converted_model_starts_from_teacher_weights(lm_workdir):
    """At update 0 the converted model must carry the teacher's weights (same embeddings, FFNs)."""
    out = _finetune(lm_workdir, lm_workdir / "t2r0", 1, ["--lr", 1e-12])
    student = torch.load(lm_workdir / "t2r0/checkpoint_last.pt", weights_only=False)["model"]
    teacher = torch.load(lm_workdir / "softmax/checkpoint_last.pt", weights_only=False)["model"]
    for name in ("decoder.layers.1.fc1.weight", "decoder.layers.0.self_attn.q_proj.weight",
                 "decoder.embed_tokens.embeddings.0.0.weight"):
        torch.testing.assert_close(student[name], teacher[name], rtol=0, atol=1e-6), out


def test_resume_skips_conversion_and_continues(lm_workdir):
    save = lm_workdir / "resume"
    _finetune(lm_workdir, save, 5)
    second = _finetune(lm_workdir, save, 10)
    assert conversion_log(second.stdout + second.stderr) is None
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 10


def test_offline_converter_then_eval_and_finetune(lm_workdir):
    out_path = lm_workdir / "offline/t2r.pt"
    result = run(["t2r-convert", "--input", lm_workdir / "softmax/checkpoint_last.pt", "--output", out_path])
    teacher = torch.load(lm_workdir / "softmax/checkpoint_last.pt", weights_only=False)["model"]
    converted = torch.load(out_path)["model"]  # safe loading: the plugin writes only plain types
    assert converter_log(result.stderr + result.stdout) == set(converted) - set(teacher) == NEW
    for name, value in teacher.items():
        torch.testing.assert_close(converted[name], value, rtol=0, atol=0)
    ppl = _perplexity(run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path", out_path,
                           "--tokens-per-sample", 64, "--cpu"]).stderr)
    assert ppl > 1.0
    run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "language_modeling",
         "--finetune-from-model", out_path, "--arch", "t2r_lm_wiki103", *MODEL, *TRAIN, "--max-update", 3,
         "--save-dir", lm_workdir / "offline/ft"])


def test_shape_mismatch_names_parameter_and_shapes(lm_workdir):
    bad = list(MODEL)
    bad[bad.index("--decoder-ffn-embed-dim") + 1] = 48
    proc = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
                "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *bad, *TRAIN,
                "--max-update", 1, "--save-dir", lm_workdir / "bad"], check=False)
    assert proc.returncode != 0
    assert re.search(r"fc1\.weight: checkpoint \(64, 32\) vs model \(48, 32\)", proc.stderr), proc.stderr[-2000:]


def test_attention_transfer_trains_only_feature_maps_first(lm_workdir):
    save = lm_workdir / "transfer"
    out = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
               "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL,
               *[a for a in TRAIN if a not in ("--criterion", "adaptive_loss")], "--criterion",
               "t2r_attention_transfer", "--attention-transfer-only-updates", 4, "--max-update", 4,
               "--save-dir", save, "--log-interval", 1])
    log = out.stdout + out.stderr
    transfer = [float(x) for x in re.findall(r"transfer_loss=([0-9.]+)", log)]
    assert len(transfer) == 4 and all(0 < t < 10 for t in transfer), log[-3000:]  # logged every update
    student = torch.load(save / "checkpoint_last.pt", weights_only=False)["model"]
    teacher = torch.load(lm_workdir / "softmax/checkpoint_last.pt", weights_only=False)["model"]
    for name, value in teacher.items():  # everything but the feature maps is still the teacher's
        torch.testing.assert_close(student[name], value, rtol=0, atol=0)
    fresh = torch.load(lm_workdir / "t2r0/checkpoint_last.pt", weights_only=False)["model"] \
        if (lm_workdir / "t2r0/checkpoint_last.pt").exists() else None
    if fresh is not None:  # same seed, same init: the feature maps moved
        assert not torch.equal(student["decoder.layers.0.self_attn.feature_map.weight"],
                               fresh["decoder.layers.0.self_attn.feature_map.weight"])


def test_attention_transfer_logs_loss_as_the_sum_of_its_terms(lm_workdir):
    out = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
               "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL,
               *[a for a in TRAIN if a not in ("--criterion", "adaptive_loss")], "--criterion",
               "t2r_attention_transfer", "--attention-transfer-weight", 3, "--max-update", 3,
               "--no-save", "--disable-validation", "--log-interval", 1])
    lines = re.findall(r"train_inner \|.*? loss=([0-9.]+), nll_loss=([0-9.]+), transfer_loss=([0-9.]+)",
                       out.stdout + out.stderr)
    assert len(lines) == 3, (out.stdout + out.stderr)[-3000:]
    for loss, nll, transfer in ((float(x) for x in line) for line in lines):
        assert transfer > 0.01 and abs(loss - (nll + transfer)) <= 0.0015, (loss, nll, transfer)


def _last_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def test_convert_from_into_a_softmax_architecture_is_refused(lm_workdir):
    """The t2r_ twin forgotten: a softmax model would load the softmax weights and train on, rc 0."""
    proc = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
                "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "transformer_lm_wiki103",
                *MODEL, *TRAIN, "--max-update", 1, "--save-dir", lm_workdir / "softmax_arch"], check=False)
    assert "--arch transformer_lm_wiki103 builds a softmax model: use its T2R twin, --arch t2r_lm_wiki103" in \
        _last_line(proc)
    assert not (lm_workdir / "softmax_arch/checkpoint_last.pt").exists()


def test_converting_into_a_model_with_every_layer_softmax_is_refused(lm_workdir):
    proc = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
                "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL,
                "--t2r-softmax-layers", "0,1", *TRAIN, "--max-update", 1, "--save-dir", lm_workdir / "all_softmax"],
               check=False)
    assert "--t2r-softmax-layers covers all 2 decoder layers: every attention stays softmax" in _last_line(proc)
    proc = run(["t2r-convert", "--input", lm_workdir / "softmax/checkpoint_last.pt", "--output",
                lm_workdir / "all_softmax.pt", "--t2r-softmax-layers", "0,1"], check=False)
    assert "every attention stays softmax" in _last_line(proc) and not (lm_workdir / "all_softmax.pt").exists()


def test_finetune_from_model_reads_the_t2r_options_of_the_checkpoint(lm_workdir):
    """t2r-convert with non-default T2R flags, then fairseq-train --finetune-from-model without them: the
    checkpoint's options are used (logged) and saved with the finetuned checkpoints, which then load;
    a flag given with another value is refused in one line naming both."""
    converted = lm_workdir / "hedgehog/t2r.pt"
    run(["t2r-convert", "--input", lm_workdir / "softmax/checkpoint_last.pt", "--output", converted,
         "--t2r-feature-map", "hedgehog", "--t2r-feature-dim", 4])
    finetune = ["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "language_modeling",
                "--finetune-from-model", converted, "--arch", "t2r_lm_wiki103", *MODEL, *TRAIN, "--max-update", 2]
    proc = run([*finetune, "--save-dir", lm_workdir / "hedgehog/ft"])
    log = proc.stdout + proc.stderr
    assert "--t2r-feature-map hedgehog: read from --finetune-from-model" in log, log[-3000:]
    assert "--t2r-feature-dim 4: read from --finetune-from-model" in log
    saved = torch.load(lm_workdir / "hedgehog/ft/checkpoint_last.pt", weights_only=False)["cfg"]["model"]
    assert (saved["t2r_feature_map"], saved["t2r_feature_dim"]) == ("hedgehog", 4)
    assert _perplexity(run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path",
                            lm_workdir / "hedgehog/ft/checkpoint_last.pt", "--tokens-per-sample", 64,
                            "--cpu"]).stderr) > 1.0
    proc = run([*finetune, "--t2r-feature-dim", 8, "--save-dir", lm_workdir / "hedgehog/bad"], check=False)
    assert ("--t2r-feature-dim 8 disagrees with --finetune-from-model" in _last_line(proc)
            and "built with --t2r-feature-dim 4" in _last_line(proc))


def test_convert_says_when_it_replaces_a_file(lm_workdir):
    out = lm_workdir / "again/t2r.pt"
    first = run(["t2r-convert", "--input", lm_workdir / "softmax/checkpoint_last.pt", "--output", out])
    second = run(["t2r-convert", "--input", lm_workdir / "softmax/checkpoint_last.pt", "--output", out])
    assert "(replaced" not in first.stderr + first.stdout
    assert f"wrote {out} (replaced the file that was there)" in second.stderr + second.stdout
