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
