"""fairseq's inference and data paths on a T2R language model, run as a user types them: prompting
through fairseq-interactive, the hub interface (`from_pretrained(..., user_dir=...)`, `.sample()`,
`.score()`) in a fresh Python process, and training on sentences (`--sample-break-mode eos`).
fairseq's data code behind them needs numpy 1.x (issue 11). The hub interface of a translation
model (`.translate()`) is run by the README's Python API section (tests/test_readme_blocks.py)."""
import re
import sys

import pytest

from helpers import MODEL, ROOT, TRAIN, USER_DIR, run


@pytest.fixture(scope="module")
def t2r_lm(lm_workdir):
    """lm_workdir's softmax model converted to T2R: a model directory as `from_pretrained` takes it."""
    model_dir = lm_workdir / "user_paths"
    run(["t2r-convert", "--input", lm_workdir / "softmax/checkpoint_last.pt", "--output",
         model_dir / "checkpoint_last.pt"])
    return model_dir


def test_interactive_prompts_a_t2r_language_model(lm_workdir, t2r_lm):
    prompts = ["the value of the", "return a new"]
    out = run(["fairseq-interactive", lm_workdir / "bin", "--task", "language_modeling", "--user-dir", USER_DIR,
               "--path", t2r_lm / "checkpoint_last.pt", "--sampling", "--beam", 1, "--seed", 1],
              input="\n".join(prompts) + "\n").stdout
    hypotheses = dict(re.findall(r"^H-(\d+)\t\S+\t(.*)$", out, flags=re.M))
    assert sorted(hypotheses) == ["0", "1"], out[-2000:]
    for i, prompt in enumerate(prompts):  # a continuation of each prompt, generated token by token
        assert hypotheses[str(i)].startswith(prompt + " "), (prompt, hypotheses[str(i)])
        assert len(hypotheses[str(i)].split()) > len(prompt.split())


HUB = """
from fairseq.models.transformer_lm import TransformerLanguageModel

lm = TransformerLanguageModel.from_pretrained({model_dir!r}, "checkpoint_last.pt", data_name_or_path={data!r},
                                              user_dir={user_dir!r})
lm.eval()
print("attention:", type(lm.models[0].decoder.layers[0].self_attn).__name__)
scores = lm.score("the value of the expression is")["positional_scores"]
print("scores:", " ".join(f"{{s:.4f}}" for s in scores.tolist()))
print("sample:", lm.sample("the value of", beam=1, sampling=True, sampling_topk=10, max_len_b=8))
print("beam:", lm.sample(["the value of", "return a new"], beam=2, max_len_b=8))
"""


def test_hub_interface_samples_and_scores_a_t2r_language_model(lm_workdir, t2r_lm):
    """A fresh process that does not import t2r_fairseq itself: from_pretrained's user_dir does."""
    code = HUB.format(model_dir=str(t2r_lm), data=str(lm_workdir / "bin"), user_dir=USER_DIR)
    out = run([sys.executable, "-c", code]).stdout
    assert "attention: T2RSelfAttention" in out, out
    scores = [float(s) for s in re.search(r"^scores: (.*)$", out, flags=re.M).group(1).split()]
    assert len(scores) == 6 and all(-30 < s < 0 for s in scores)  # a log-probability per word
    assert re.search(r"^sample: the value of \S", out, flags=re.M), out
    assert re.search(r"^beam: \['the value of \S.*', 'return a new \S.*'\]$", out, flags=re.M), out


def test_train_on_sentences_with_sample_break_mode_eos(lm_workdir):
    """--sample-break-mode eos: one sentence per sample, padded batches, fairseq's numpy data code."""
    save = lm_workdir / "eos"
    out = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
               "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL,
               *TRAIN, "--sample-break-mode", "eos", "--max-update", 3, "--save-dir", save, "--log-interval", 1])
    log = out.stdout + out.stderr
    losses = [float(x) for x in re.findall(r"train_inner \|.*? loss=([0-9.]+)", log)]
    assert len(losses) == 3 and all(0 < loss < 20 for loss in losses), log[-3000:]
    # One sentence per sample: the batches hold many short samples, not blocks of 64 tokens.
    sizes = [float(x) for x in re.findall(r"train_inner \|.*? bsz=([0-9.]+)", log)]
    assert sizes and min(sizes) > 512 / 64, log[-3000:]
    assert (save / "checkpoint_last.pt").is_file()


def test_without_the_plugin_fairseq_fails_as_the_readme_says(lm_workdir, t2r_lm):
    """README's Troubleshooting names the ways fairseq fails on a T2R checkpoint without --user-dir (or
    import t2r_fairseq): each is what fairseq prints today, so the page helps whoever searches for it."""
    checkpoint = t2r_lm / "checkpoint_last.pt"
    readme = (ROOT / "README.md").read_text()
    eval_lm = run(["fairseq-eval-lm", lm_workdir / "bin", "--path", checkpoint, "--cpu"], check=False)
    generate = run(["fairseq-generate", lm_workdir / "bin", "--task", "language_modeling", "--path", checkpoint,
                    "--cpu"], check=False)
    hub = run([sys.executable, "-c", "from fairseq.models.transformer_lm import TransformerLanguageModel as LM; "
               f"LM.from_pretrained({str(t2r_lm)!r}, 'checkpoint_last.pt', data_name_or_path="
               f"{str(lm_workdir / 'bin')!r})"], check=False)
    message = "KeyError: \"'_name'\""
    assert message in readme
    for proc in (eval_lm, generate, hub):
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1500:]
