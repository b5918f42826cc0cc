"""The translation path: encoder-decoder T2R models (t2r_transformer).

Model level: token-by-token decoding equals the full forward with left-padded sources (fairseq
pads sources on the left), each sentence decoded inside a padded batch equals it decoded alone,
and beam-search reordering of the state equals decoding the permuted batch; for T2R and for
softmax cross-attention.

CLI level, on a tiny parallel corpus made here (source: a sentence of Python's documentation,
target: the same words reversed): fairseq-preprocess, a softmax teacher under fairseq-train,
conversion by `--task t2r_translation --convert-from` and by `t2r-convert`, then fairseq-generate
(beam 5) and fairseq-interactive, and batch-size invariance of the generated hypotheses.

Recipe level: examples/translation/multi30k.py end to end at a tiny size (needs ../shared/data).
"""
import re

import pytest
import torch

import t2r_fairseq  # noqa: F401  (lets torch's safe loading read fairseq checkpoints, as the CLIs do)
from helpers import ROOT, USER_DIR, build_model, run, write_parallel_corpus

TINY_MT_SOFTMAX = ["--encoder-layers", 2, "--decoder-layers", 2, "--encoder-embed-dim", 32,
                   "--decoder-embed-dim", 32, "--encoder-ffn-embed-dim", 64, "--decoder-ffn-embed-dim", 64,
                   "--encoder-attention-heads", 4, "--decoder-attention-heads", 4, "--dropout", 0]
TINY_MT = TINY_MT_SOFTMAX + ["--t2r-feature-dim", 8]

CASES = {
    "t2r": TINY_MT,
    "softmax_cross": TINY_MT + ["--t2r-cross-attention", "softmax"],
    "elu": TINY_MT + ["--t2r-feature-map", "elu"],
    "hybrid": TINY_MT + ["--t2r-softmax-layers", "0"],
}
VOCAB = 60


def _model(case):
    model, _ = build_model("t2r_transformer", CASES[case], vocab=VOCAB, task="translation")
    return model


def _left_padded_sources(lengths, pad, eos, seed=0):
    """(batch, max_len) source tokens, each row padded on the left and ending in eos, as
    fairseq's LanguagePairDataset collates them (left_pad_source=True)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), pad)
    for i, n in enumerate(lengths):
        src[i, -n:] = torch.randint(4, VOCAB, (n,), generator=g)
        src[i, -1] = eos
    return src, torch.tensor(lengths)


def _targets(batch, time, eos, seed=1):
    g = torch.Generator().manual_seed(seed)
    tgt = torch.randint(4, VOCAB, (batch, time), generator=g)
    tgt[:, 0] = eos  # prev_output_tokens start with eos, as in fairseq
    return tgt


def _log_probs(model, tokens, encoder_out, **kwargs):
    return model.get_normalized_probs(model.decoder(tokens, encoder_out=encoder_out, **kwargs), log_probs=True)


def _incremental(model, tokens, encoder_out, state=None, start=0):
    state = {} if state is None else state
    steps = [_log_probs(model, tokens[:, :t + 1], encoder_out, incremental_state=state)
             for t in range(start, tokens.size(1))]
    return torch.cat(steps, dim=1), state


@pytest.mark.parametrize("case", CASES)
def test_incremental_decoding_equals_full_forward_with_left_padded_sources(case):
    model = _model(case)
    d = model.decoder.dictionary
    src, lengths = _left_padded_sources([9, 5, 1, 7], d.pad(), d.eos())
    tgt = _targets(4, 70, d.eos())  # crosses a chunk boundary (64) of the parallel form
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full = _log_probs(model, tgt, enc)
        steps, _ = _incremental(model, tgt, enc)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", CASES)
def test_sentence_in_padded_batch_equals_sentence_alone(case):
    """Source padding must not leak into cross-attention: what fairseq-generate's batch-size
    invariance rests on."""
    model = _model(case)
    d = model.decoder.dictionary
    lengths = [9, 5, 1, 7]
    src, lens = _left_padded_sources(lengths, d.pad(), d.eos())
    tgt = _targets(4, 12, d.eos())
    with torch.no_grad():
        batch = _incremental(model, tgt, model.encoder(src, src_lengths=lens))[0]
        for i, n in enumerate(lengths):
            alone = _incremental(model, tgt[i:i + 1], model.encoder(src[i:i + 1, -n:], src_lengths=lens[i:i + 1]))[0]
            torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-4)


# Beam search (2 sentences x beam 3, rows grouped by sentence) reorders rows within a sentence,
# duplicating some, and drops the rows of finished sentences. fairseq's softmax cross-attention
# relies on that (its cached source keys are left alone when the batch size is unchanged); T2R's
# cross-attention state is reordered like any other, so any order works for it.
ORDERS = {"beam": [1, 1, 0, 5, 3, 3], "finished": [4, 4, 5], "any": [2, 0, 5, 5, 1, 3]}


@pytest.mark.parametrize("case,order", [(c, o) for c in ("t2r", "softmax_cross", "hybrid") for o in ORDERS
                                        if o != "any" or c != "softmax_cross"])
def test_reorder_equals_decoding_permuted_batch(case, order):
    model = _model(case)
    d = model.decoder.dictionary
    src, lengths = _left_padded_sources([6, 9], d.pad(), d.eos(), seed=2)
    rows = torch.arange(2).repeat_interleave(3)  # sentence of each of the 6 hypotheses
    tgt = _targets(6, 12, d.eos(), seed=3)
    order = torch.tensor(ORDERS[order])
    with torch.no_grad():
        enc = model.encoder.reorder_encoder_out(model.encoder(src, src_lengths=lengths), rows)
        _, state = _incremental(model, tgt[:, :6], enc)
        # What fairseq's SequenceGenerator does between steps: reorder the decoder state and the
        # encoder output alike.
        model.decoder.reorder_incremental_state_scripting(state, order)
        continued, _ = _incremental(model, tgt[order], model.encoder.reorder_encoder_out(enc, order),
                                    state=state, start=6)
        reference = _log_probs(model, tgt[order], model.encoder(src[rows[order]],
                                                                src_lengths=lengths[rows[order]]))[:, 6:]
    torch.testing.assert_close(continued, reference, rtol=1e-4, atol=1e-4)


def test_cross_attention_state_is_computed_once_per_sentence():
    """The cross-attention state over the source is cached at the first step: later steps must
    not depend on the encoder output any more (it is the RNN's constant-size memory)."""
    model = _model("t2r")
    d = model.decoder.dictionary
    src, lengths = _left_padded_sources([6, 4], d.pad(), d.eos())
    tgt = _targets(2, 5, d.eos())
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        reference, _ = _incremental(model, tgt, enc)
        state = {}
        _log_probs(model, tgt[:, :1], enc, incremental_state=state)
        garbage = {**enc, "encoder_out": [torch.randn_like(enc["encoder_out"][0])]}
        rest, _ = _incremental(model, tgt, garbage, state=state, start=1)
    torch.testing.assert_close(rest, reference[:, 1:], rtol=1e-4, atol=1e-4)


# -- the user's workflow through fairseq's CLIs --------------------------------------------------
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
    assert re.search(r"converted .*: reused \d+ tensors, 8 new", log), log[-3000:]
    assert "decoder.layers.1.encoder_attn.feature_map.weight" in log
    assert re.search(r"valid on 'valid' subset \| loss [0-9.]+", log), log[-3000:]
    state = torch.load(checkpoint)  # safe loading (the plugin allows fairseq's Namespace)
    teacher = torch.load(workdir / "softmax/checkpoint_last.pt")
    assert state["cfg"]["model"].arch == "t2r_transformer" and teacher["cfg"]["model"].arch == "transformer"
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


def _check_converted(teacher_path, out_path, roles):
    teacher = torch.load(teacher_path)["model"]
    converted = torch.load(out_path)
    assert set(converted["model"]) - set(teacher) == {f"decoder.layers.{i}.{role}.feature_map.{p}" for i in range(2)
                                                      for role in roles for p in ("weight", "bias")}
    for name, value in teacher.items():
        torch.testing.assert_close(converted["model"][name], value, rtol=0, atol=0)
    return converted


def test_offline_converter_then_generate(workdir):
    out_path = workdir / "offline/t2r.pt"
    result = run(["t2r-convert", "--input", workdir / "softmax/checkpoint_last.pt", "--output", out_path])
    assert "8 new tensors" in result.stdout + result.stderr
    converted = _check_converted(workdir / "softmax/checkpoint_last.pt", out_path, ("self_attn", "encoder_attn"))
    assert converted["cfg"]["model"].arch == "t2r_transformer"
    hyps = _hypotheses(run(["fairseq-generate", workdir / "bin", "--path", out_path, *GENERATE,
                            "--batch-size", 16, "--gen-subset", "test"]).stdout)
    assert sorted(hyps) == list(range(N_TEST))


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


# -- examples/translation/multi30k.py at a tiny size -----------------------------------------------
MULTI30K = ROOT.parent / "shared/data/multi30k"
TINY_RECIPE = ["--train-lines", 200, "--valid-lines", 30, "--test-lines", 20, "--vocab", 300, "--layers", 1,
               "--embed-dim", 32, "--ffn-dim", 64, "--heads", 2, "--feature-dim", 8, "--teacher-updates", 8,
               "--finetune-updates", 3, "--max-tokens", 1024,
               # The ELU row runs the same code path as T2R with one more flag, and the interleaved
               # re-timing repeats the rows' own generate runs: skipping both saves five CLI runs.
               "--rows", "teacher,t2r_pretrain,teacher_continued", "--speed-repeats", 0]


@pytest.mark.skipif(not (MULTI30K / "train.en").is_file(), reason=f"needs Multi30k at {MULTI30K}")
def test_multi30k_recipe_runs_at_tiny_size(tmp_path):
    import json
    import sys

    results = tmp_path / "multi30k.json"
    cmd = [sys.executable, ROOT / "examples/translation/multi30k.py", MULTI30K, "--work", tmp_path / "work",
           "--results", results, *TINY_RECIPE]
    run(cmd)
    recorded = json.loads(results.read_text())
    assert set(recorded) == {"teacher", "t2r_pretrain", "teacher_continued", "setup"}
    # teacher_continued gets exactly the updates T2R's finetuning got.
    for name, updates in (("teacher", 8), ("t2r_pretrain", 3), ("teacher_continued", 3)):
        row = recorded[name]
        assert 0.0 <= row["bleu"] <= 100.0 and row["updates"] == updates, row
        assert row["sentences_per_s_runs"] == [row["sentences_per_s"]] and row["sentences_per_s"] > 0
        hyps = (tmp_path / f"work/{name}.test.de").read_text().splitlines()
        assert len(hyps) == 20 and "▁" not in "".join(hyps)  # detokenized: sentencepiece pieces joined
    commands = "\n".join(recorded["setup"]["commands"])
    assert "--task t2r_translation" in commands and "--convert-from" in commands
    assert "--finetune-from-model" in commands
    assert {"machine", "date"} <= set(recorded["setup"])
    # Resumable: recorded rows are not trained again.
    again = run(cmd)
    assert again.stdout.count("recorded already") == 3, again.stdout
    # The README's fairseq-interactive command, with the recipe's sentencepiece model.
    work = tmp_path / "work"
    line = tmp_path / "input.en"
    line.write_text("A man is riding a bike.\n")
    out = run(["fairseq-interactive", work / "bin", "--user-dir", USER_DIR, "--path",
               work / "t2r_pretrain/checkpoint_last.pt", "--beam", 5, "--bpe", "sentencepiece",
               "--sentencepiece-model", work / "spm/spm.model", "--source-lang", "en", "--target-lang", "de",
               "--max-len-b", 10, "--cpu", "--input", line]).stdout
    assert re.search(r"^D-0\t\S+\t[^▁]*$", out, flags=re.M), out


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
