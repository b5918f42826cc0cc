"""The translation workflow through fairseq's CLIs, on a tiny parallel corpus made here (source: a
line of Python's documentation, target: its words reversed): fairseq-preprocess, a softmax teacher
under fairseq-train, conversion by `--task t2r_translation --convert-from` and by `t2r-convert`,
then fairseq-generate (beam 5) and fairseq-interactive, batch-size invariance of the hypotheses,
and the attention-transfer criterion on t2r_translation."""
import re

import pytest
import torch

import t2r_fairseq  # noqa: F401  (lets torch's safe loading read fairseq checkpoints, as the CLIs do)
from helpers import TINY_MT, TINY_MT_SOFTMAX, USER_DIR, conversion_log, converter_log, run, write_parallel_corpus

TRAIN = ["--optimizer", "adam", "--lr", 3e-3, "--batch-size", 32, "--criterion", "label_smoothed_cross_entropy",
         "--label-smoothing", 0.1, "--share-all-embeddings", "--no-epoch-checkpoints", "--cpu", "--num-workers", 0,
         "--log-format", "simple", "--log-interval", 10, "--seed", 1]
# fairseq's batch_by_size drops a last batch whose size is not a multiple of
# --required-batch-size-multiple (default 8): generation would silently skip sentences.
GENERATE = ["--user-dir", USER_DIR, "--beam", 5, "--required-batch-size-multiple", 1, "--cpu"]
N_TEST = 21  # not a multiple of 8, so the flag above matters


def _hypotheses(output: str) -> dict:
    """{sentence id: (score, hypothesis)} from fairseq-generate/-interactive's H- lines."""
    found = re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", output, flags=re.M)
    return {int(i): (float(score), hyp) for i, score, hyp in found}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    raw = write_parallel_corpus(root / "raw", {"train": 400, "valid": 40, "test": N_TEST})
    # Rare words become <unk>: a small joined vocabulary keeps the tiny run fast.
    run(["fairseq-preprocess", "--source-lang", "src", "--target-lang", "tgt", "--trainpref", raw / "train",
         "--validpref", raw / "valid", "--testpref", raw / "test", "--destdir", root / "bin",
         "--joined-dictionary", "--thresholdsrc", 2, "--workers", 1])
    run(["fairseq-train", root / "bin", "--task", "translation", "--arch", "transformer", *TINY_MT_SOFTMAX,
         *TRAIN, "--max-update", 30, "--save-dir", root / "softmax", "--disable-validation"])
    return root


@pytest.fixture(scope="module")
def finetuned(workdir):
    """Converted by the task (--convert-from) and finetuned a few updates, validating on the way."""
    proc = run(["fairseq-train", workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_translation",
                "--convert-from", workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_transformer", *TINY_MT,
                *TRAIN, "--max-update", 6, "--save-dir", workdir / "t2r"])
    return workdir / "t2r/checkpoint_last.pt", proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def generated(workdir, finetuned):
    """fairseq-generate (beam 5) on the test split at batch size 64 and 1: {batch size: hypotheses}."""
    checkpoint, _ = finetuned
    return {bs: _hypotheses(run(["fairseq-generate", workdir / "bin", "--path", checkpoint, *GENERATE,
                                 "--batch-size", bs, "--gen-subset", "test"]).stdout) for bs in (64, 1)}


def test_convert_from_finetunes_and_generates(workdir, finetuned, generated):
    checkpoint, log = finetuned
    state = torch.load(checkpoint)  # safe loading (the plugin allows fairseq's Namespace)
    teacher = torch.load(workdir / "softmax/checkpoint_last.pt")
    assert state["cfg"]["model"].arch == "t2r_transformer" and teacher["cfg"]["model"].arch == "transformer"
    # Every teacher tensor reused; new: the feature maps of decoder self- and cross-attention.
    reused, new = conversion_log(log)
    assert new == _feature_maps(("self_attn", "encoder_attn")) == set(state["model"]) - set(teacher["model"])
    assert reused + len(new) == len(state["model"])
    valid_losses = [float(x) for x in re.findall(r"valid on 'valid' subset \| loss ([0-9.]+)", log)]
    assert valid_losses and all(0 < loss < 20 for loss in valid_losses), log[-3000:]
    hyps = generated[64]
    assert sorted(hyps) == list(range(N_TEST))
    assert all(hyp.strip() for _, hyp in hyps.values())


def test_generation_is_batch_size_invariant(generated):
    """Left-padded sources in a batch of 64 must give exactly the hypotheses of batch size 1."""
    one, many = generated[1], generated[64]
    assert sorted(one) == sorted(many) == list(range(N_TEST))
    assert {i: h for i, (_, h) in one.items()} == {i: h for i, (_, h) in many.items()}
    for i in one:
        assert abs(one[i][0] - many[i][0]) < 1e-3, (i, one[i], many[i])


def test_interactive_translates_input_lines(workdir, finetuned):
    checkpoint, _ = finetuned
    lines = ["the value of the expression", "return a new list"]
    source = workdir / "interactive.src"
    source.write_text("\n".join(lines) + "\n")
    out = run(["fairseq-interactive", workdir / "bin", "--path", checkpoint, *GENERATE, "--input", source,
               "--source-lang", "src", "--target-lang", "tgt"]).stdout
    assert re.findall(r"^S-\d+\t(.*)$", out, flags=re.M) == lines
    assert sorted(_hypotheses(out)) == [0, 1]


def _feature_maps(roles):
    """Names of the feature-map tensors of both decoder layers' attention `roles`: what conversion adds."""
    return {f"decoder.layers.{i}.{role}.feature_map.{p}" for i in range(2) for role in roles
            for p in ("weight", "bias")}


def _check_converted(teacher_path, out_path, roles):
    teacher = torch.load(teacher_path)["model"]
    converted = torch.load(out_path)
    assert set(converted["model"]) - set(teacher) == _feature_maps(roles)
    for name, value in teacher.items():
        torch.testing.assert_close(converted["model"][name], value, rtol=0, atol=0)
    return converted


def test_offline_converter_then_generate(workdir):
    out_path = workdir / "offline/t2r.pt"
    result = run(["t2r-convert", "--input", workdir / "softmax/checkpoint_last.pt", "--output", out_path])
    converted = _check_converted(workdir / "softmax/checkpoint_last.pt", out_path, ("self_attn", "encoder_attn"))
    assert converter_log(result.stdout + result.stderr) == _feature_maps(("self_attn", "encoder_attn"))
    assert converted["cfg"]["model"].arch == "t2r_transformer"
    hyps = _hypotheses(run(["fairseq-generate", workdir / "bin", "--path", out_path, *GENERATE,
                            "--batch-size", 16, "--gen-subset", "test"]).stdout)
    assert sorted(hyps) == list(range(N_TEST))


@pytest.mark.parametrize("name,flags", [
    # A softmax window shorter than the targets (the ring buffer wraps and older keys move into the state)
    # with a gated decay.
    ("window", ["--t2r-window", 2, "--t2r-decay", "gated"]),
    # Cross-attention with its own feature map and size (self-attention keeps the defaults: t2r, 32).
    ("cross_features", ["--t2r-cross-feature-map", "hedgehog", "--t2r-cross-feature-dim", 16]),
])
def test_converted_generation_is_batch_size_invariant(workdir, name, flags):
    """Beam search gives every sentence of a batch of 25 the hypothesis and score it gets alone."""
    out_path = workdir / f"{name}/t2r.pt"
    result = run(["t2r-convert", "--input", workdir / "softmax/checkpoint_last.pt", "--output", out_path, *flags])
    if name == "cross_features":
        weights = torch.load(out_path)["model"]
        assert weights["decoder.layers.0.encoder_attn.feature_map.projection.weight"].shape[:2] == (4, 16)
        assert weights["decoder.layers.0.self_attn.feature_map.weight"].shape[:2] == (4, 32)
        hedgehog = {f"decoder.layers.{i}.encoder_attn.feature_map.projection.{p}" for i in range(2)
                    for p in ("weight", "bias")}
        assert converter_log(result.stdout + result.stderr) == _feature_maps(("self_attn",)) | hedgehog
    one, many = (_hypotheses(run(["fairseq-generate", workdir / "bin", "--path", out_path, *GENERATE,
                                  "--batch-size", bs, "--gen-subset", "test"]).stdout) for bs in (1, 25))
    assert sorted(one) == sorted(many) == list(range(N_TEST))
    assert max(len(h.split()) for _, h in one.values()) >= 2  # with </s>, longer than a window of 2
    assert {i: h for i, (_, h) in one.items()} == {i: h for i, (_, h) in many.items()}
    for i in one:
        assert abs(one[i][0] - many[i][0]) < 1e-3, (i, one[i], many[i])


def test_offline_converter_softmax_cross_attention_loads_and_beam_searches(workdir):
    """--t2r-cross-attention softmax: the checkpoint loads under fairseq's own loader, and beam search
    (fairseq's SequenceGenerator) gives each sentence the same hypothesis in a padded batch as alone.
    In-process: the CLI path is the one test_offline_converter_then_generate runs."""
    from fairseq import checkpoint_utils
    from fairseq.modules import MultiheadAttention
    from fairseq.sequence_generator import SequenceGenerator

    from t2r_fairseq.attention import T2RSelfAttention
    from t2r_fairseq.convert import main as convert_main

    out_path = workdir / "offline/softmax_cross.pt"
    assert convert_main(["--input", str(workdir / "softmax/checkpoint_last.pt"), "--output", str(out_path),
                         "--t2r-cross-attention", "softmax"]) == 0
    _check_converted(workdir / "softmax/checkpoint_last.pt", out_path, ("self_attn",))
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(out_path)],
                                                                    arg_overrides={"data": str(workdir / "bin")})
    model = models[0].eval()
    layer = model.decoder.layers[0]
    assert isinstance(layer.encoder_attn, MultiheadAttention) and isinstance(layer.self_attn, T2RSelfAttention)
    task.load_dataset("test")
    data = task.dataset("test")
    generator = SequenceGenerator([model], task.target_dictionary, beam_size=5)
    with torch.no_grad():
        sample = data.collater([data[i] for i in range(N_TEST)])  # sorted by length, left-padded
        batch = dict(zip(sample["id"].tolist(), generator.generate([model], sample)))
        for i in range(0, N_TEST, 3):  # a third of them alone keeps the test quick
            alone = generator.generate([model], data.collater([data[i]]))
            assert torch.equal(alone[0][0]["tokens"], batch[i][0]["tokens"]), i


def test_attention_transfer_criterion_trains_translation(workdir):
    """t2r_attention_transfer on t2r_translation: the transfer term is logged each update, and in
    the feature-map-only stage nothing but feature maps moves (decoder self- and cross-attention)."""
    save = workdir / "transfer"
    train = [a for a in TRAIN if a not in ("label_smoothed_cross_entropy", "--label-smoothing", 0.1)]
    train[train.index("--criterion") + 1] = "t2r_attention_transfer"
    out = run(["fairseq-train", workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_translation",
               "--convert-from", workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_transformer", *TINY_MT,
               *train, "--attention-transfer-only-updates", 3, "--max-update", 3, "--save-dir", save,
               "--log-interval", 1, "--disable-validation"])
    log = out.stdout + out.stderr
    transfer = [float(x) for x in re.findall(r"transfer_loss=([0-9.]+)", log)]
    assert len(transfer) == 3 and all(t > 0 for t in transfer), log[-3000:]
    student = torch.load(save / "checkpoint_last.pt")["model"]
    teacher = torch.load(workdir / "softmax/checkpoint_last.pt")["model"]
    moved = {n for n in student if n not in teacher or not torch.equal(student[n], teacher[n])}
    assert moved and all(".feature_map." in n for n in moved), sorted(moved)
