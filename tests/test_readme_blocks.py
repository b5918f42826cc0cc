"""Every shell block of every README and of docs/ runs through bash as written, at a tiny size; so does
README.md's Python API section.

A command that a test only parses can still fail in a shell (quoting, a variable never set, a file an
earlier step did not write), so each README's ```bash blocks run in order, in one `bash` process with
`set -euo pipefail`, from a sandbox laid out like the repository root; the pages of docs/ continue
README.md's commands in its sandbox. What may differ from a user's
run, and nothing else:
- sizes: the values of named flags are substituted (`--max-update 50000` -> 2, ...), an architecture
  name gets tiny dimensions after it, `--fp16` becomes `--cpu`; `...` in a command (the README's "the
  rest of your options") becomes a tiny model's options. Each substitution must match something, so a
  README edit cannot silently escape it.
- stand-ins on PATH for what needs the network or is not installed here: `git clone` of fairseq (its
  data scripts copy tiny local data instead of downloading WikiText-103 and WMT14), `wget` of the
  public WikiText-103 model (a tiny checkpoint of the same architecture, with its dict.txt), sacreBLEU's
  test-set download (`-t`: a local reference instead), sentencepiece's spm_train/spm_encode (the same
  library's Python API) and sacremoses (not installed: text passes through), `make` (a dry run: its
  targets are the demo, run by test_demo.py, and this test suite), and `python` (the Multi30k recipe,
  whose defaults take an hour, gets tiny sizes and this sandbox's output paths).
"""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile

import pytest

from helpers import BIN, MODEL, ROOT, TRAIN, write_parallel_corpus

FENCE = re.compile(r"^( *)```([A-Za-z]*)\n(.*?)^\1```", flags=re.S | re.M)
SHELL = ("bash", "sh", "shell")
# Commands a README's untagged block would start with if it were a shell block.
COMMAND = re.compile(r"(make|python|bash|echo|git|wget|spm_\w+|sacrebleu|fairseq-[\w-]+|t2r-[\w-]+)\b|[A-Z_]+=")

TINY_MT = ["--encoder-layers", 1, "--decoder-layers", 1, "--encoder-embed-dim", 32, "--decoder-embed-dim", 32,
           "--encoder-ffn-embed-dim", 64, "--decoder-ffn-embed-dim", 64, "--encoder-attention-heads", 2,
           "--decoder-attention-heads", 2]
TINY_MULTI30K = ["--train-lines", 200, "--valid-lines", 30, "--test-lines", 20, "--vocab", 200, "--layers", 1,
                 "--embed-dim", 32, "--ffn-dim", 64, "--heads", 2, "--teacher-updates", 2, "--max-tokens", 1024,
                 "--rows", "teacher", "--speed-repeats", 0, "--work", "runs/multi30k",
                 "--results", "results/multi30k.json"]


def words(options):
    return " ".join(map(str, options))


def fenced_blocks(text):
    """(language, line number, text) of each fenced block, indentation removed."""
    blocks = []
    for m in FENCE.finditer(text):
        indent = len(m.group(1))
        body = "".join(line[indent:] for line in m.group(3).splitlines(keepends=True))
        blocks.append((m.group(2), text.count("\n", 0, m.start()) + 1, body))
    return blocks


def section(path, title):
    text = path.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def substitute(script, flags, literal):
    """Tiny sizes: each flag's value, then each (regex, replacement); every one must match."""
    for flag, value in flags.items():
        script, n = re.subn(rf"(?<=\s){re.escape(flag)}([ =])\S+", rf"{flag}\g<1>{value}", script)
        assert n, f"no {flag} to substitute: was the README changed? update this test's substitutions"
    for pattern, replacement in literal:
        script, n = re.subn(pattern, replacement, script)
        assert n, f"nothing matches {pattern!r}: was the README changed? update this test's substitutions"
    return script


README_MD = ROOT / "README.md"
TRANSLATION = ROOT / "examples/translation/README.md"
LANGUAGE_MODEL = ROOT / "examples/language_model/README.md"
# The pages whose shell blocks run in each README's sandbox, in order: docs/ continues README.md.
PAGES = {README_MD: (README_MD, *sorted((ROOT / "docs").glob("*.md"))), TRANSLATION: (TRANSLATION,),
         LANGUAGE_MODEL: (LANGUAGE_MODEL,)}


def readme_substitutions(readme, port):
    # "...": the rest of a user's options, here the tiny model and training of tests/helpers.py.
    rest = (r"(?<=\s)\.\.\.(?=\s)", words(MODEL + TRAIN + ["--max-update", 2]))
    wmt_arch = (r"\b(t2r_)?transformer_vaswani_wmt_en_de_big\b", rf"\g<0> {words(TINY_MT)}")
    return {
        README_MD: ({"--tokens-per-sample": 64}, [("29500", str(port)), rest]),
        TRANSLATION: ({"--max-update": 2, "--max-tokens": 256, "--vocab_size": 200, "--workers": 1, "--beam": 1,
                       "--encoder-embed-dim": 32, "--decoder-embed-dim": 32, "--encoder-ffn-embed-dim": 64,
                       "--decoder-ffn-embed-dim": 64},
                      [("--fp16", "--cpu"), wmt_arch]),
        LANGUAGE_MODEL: ({"--max-update": 2, "--max-tokens": 128, "--tokens-per-sample": 64, "--context-window": 32,
                          "--workers": 1, "--t2r-softmax-layers": 1,
                          "--attention-transfer-only-updates": 1},
                         [("--fp16", "--cpu"), (r"\bt2r_lm_wiki103\b", rf"\g<0> {words(MODEL)}")]),
    }[readme]


def shell_script(readme, port):
    parts = ["set -euo pipefail", "trap 'echo \"failed: line $LINENO: $BASH_COMMAND\" >&2' ERR"]
    for page in PAGES[readme]:
        for language, line, body in fenced_blocks(page.read_text()):
            if language in SHELL:
                parts += [f"echo \"### {page.relative_to(ROOT)}, block at line {line} (at ${{SECONDS}}s)\" >&2", body]
    flags, literal = readme_substitutions(readme, port)
    return substitute("\n".join(parts) + "\n", flags, literal)


def test_every_command_block_is_tagged_bash():
    """Untagged blocks are skipped by the runs below: none of them may be commands."""
    for page in (*(page for pages in PAGES.values() for page in pages), ROOT / "results/README.md"):
        for language, line, body in fenced_blocks(page.read_text()):
            first = next((line.strip() for line in body.splitlines()
                          if line.strip() and not line.strip().startswith("#")), "")
            assert language or not COMMAND.match(first), \
                f"{page.relative_to(ROOT)}:{line}: a command block without a language: tag it ```bash"


# -- stand-ins and sandboxes -------------------------------------------------------------------
def write_executable(path, text):
    path.write_text(text)
    path.chmod(0o755)


def write_standins(root, lm_workdir):
    """Stand-ins for the network and for tools not installed, in root/bin, and their data."""
    shims, python = root / "bin", sys.executable
    shims.mkdir(parents=True)
    write_executable(shims / "git", """#!/bin/sh
# Stand-in for cloning fairseq (no network): a checkout whose data scripts copy tiny local data.
[ "$1 $2" = "clone https://github.com/facebookresearch/fairseq.git" ] || { echo "git stand-in: not $*" >&2; exit 1; }
cp -r "$T2R_STANDIN/fairseq" fairseq
""")
    write_executable(shims / "wget", """#!/bin/sh
# Stand-in for downloads (no network): the file of the same name from the stand-in folder.
cp "$T2R_STANDIN/downloads/$(basename "$1")" .
""")
    write_executable(shims / "make", f"""#!/bin/sh
# A dry run of this repository's Makefile: its targets are the demo (test_demo.py) and this suite.
exec {shutil.which("make")} -n -C {ROOT} "$@"
""")
    write_executable(shims / "python", f"""#!/bin/sh
# This environment's python; the Multi30k recipe gets tiny sizes and this sandbox's output paths.
if [ "$1 $2" = "-m examples.translation.multi30k" ]; then exec {python} "$@" {words(TINY_MULTI30K)}; fi
exec {python} "$@"
""")
    write_executable(shims / "sacremoses", """#!/bin/sh
# sacremoses is not installed here (the README says `pip install sacremoses`): text passes through.
cat
""")
    write_executable(shims / "sacrebleu", f"""#!{python}
# sacreBLEU, with the tiny local reference instead of a test set it would download (-t NAME).
import os, sys
args = sys.argv[1:]
if "-t" in args:
    i = args.index("-t")
    args[i:i + 2] = [os.path.join(os.environ["T2R_STANDIN"], "fairseq/examples/translation/wmt14_en_de/test.de")]
os.execv({str(BIN / "sacrebleu")!r}, ["sacrebleu", *args])
""")
    write_executable(shims / "spm_train", f"""#!{python}
# sentencepiece's spm_train (not installed with the Python package): the same flags, its Python API.
import sys
import sentencepiece
sentencepiece.SentencePieceTrainer.train(" ".join(sys.argv[1:]))
""")
    write_executable(shims / "spm_encode", f"""#!{python}
# sentencepiece's spm_encode (not installed with the Python package), pieces out: its Python API.
import sys
import sentencepiece
[model] = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--model=")]
assert len(sys.argv) == 2, "this stand-in takes --model= only"
processor = sentencepiece.SentencePieceProcessor(model_file=model)
for line in sys.stdin:
    print(" ".join(processor.encode(line.rstrip("\\n"), out_type=str)))
""")
    fairseq = root / "fairseq"
    wmt = write_parallel_corpus(fairseq / "examples/translation/wmt14_en_de", {"train": 300, "valid": 20, "test": 20},
                                src="en", tgt="de")
    write_executable(fairseq / "examples/translation/prepare-wmt14en2de.sh",
                     f"# stand-in: tiny local data, not WMT14\ncp -r {wmt} .\n")
    wikitext = fairseq / "examples/language_model/wikitext-103"
    wikitext.mkdir(parents=True)
    for split in ("train", "valid", "test"):  # the corpus lm_workdir's softmax model was trained on
        shutil.copy(lm_workdir / f"raw/{split}.txt", wikitext / f"wiki.{split}.tokens")
    write_executable(fairseq / "examples/language_model/prepare-wikitext-103.sh",
                     f"# stand-in: tiny local data, not WikiText-103\ncp -r {wikitext} .\n")
    (fairseq / "scripts").mkdir()
    write_executable(fairseq / "scripts/compound_split_bleu.sh", """# stand-in for fairseq's script: BLEU of the hypotheses (H-) against the references (T-)
grep ^H "$1" | cut -f3- > "$1.sys"
grep ^T "$1" | cut -f2- > "$1.ref"
fairseq-score --sys "$1.sys" --ref "$1.ref"
""")
    downloads = root / "downloads"
    downloads.mkdir()
    # The public Baevski & Auli model's archive layout, holding a tiny model of its architecture.
    with tarfile.open(downloads / "adaptive_lm_wiki103.v2.tar.bz2", "w:bz2") as archive:
        archive.add(lm_workdir / "softmax/checkpoint_last.pt", "adaptive_lm_wiki103.v2/model.pt")
        archive.add(lm_workdir / "bin/dict.txt", "adaptive_lm_wiki103.v2/dict.txt")
    return shims


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_bash(script, cwd, env, timeout=900):
    """bash in its own process group, all of which is ended afterwards (a failed distributed run
    could leave a background rank waiting)."""
    proc = subprocess.Popen(["bash", "-c", script], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if proc.returncode is None:
        proc.wait()
    return proc.returncode, out


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory, lm_workdir):
    """{readme: sandbox} after running that README's shell blocks; each README runs once, on demand."""
    done = {}

    def ran(readme):
        if readme in done:
            return done[readme]
        root = tmp_path_factory.mktemp(readme.parent.name if readme != README_MD else "readme")
        shims = write_standins(root / "standin", lm_workdir)
        repo = root / "repo"  # the repository root as the READMEs see it
        repo.mkdir()
        for name in ("t2r_fairseq", "examples", "tools"):
            (repo / name).symlink_to(ROOT / name)
        write_parallel_corpus(root / "shared/data/multi30k", {"train": 300, "val": 20, "test_2016_flickr": 20},
                              src="en", tgt="de")  # ../shared/data/multi30k
        if readme == README_MD:  # its names for a softmax model and its data
            (repo / "data-bin").symlink_to(lm_workdir / "bin")
            (repo / "softmax").symlink_to(lm_workdir / "softmax")
            (repo / "model.pt").symlink_to(lm_workdir / "softmax/checkpoint_last.pt")
        env = dict(os.environ, PATH=f"{shims}:{BIN}:{os.environ['PATH']}", T2R_STANDIN=str(root / "standin"),
                   PYTHONUNBUFFERED="1")
        code, out = run_bash(shell_script(readme, free_port()), repo, env)
        assert code == 0, f"{readme.relative_to(ROOT)}: a shell block failed (exit {code}):\n{out[-6000:]}"
        done[readme] = repo, out
        return done[readme]

    return ran


# -- the runs ------------------------------------------------------------------------------------
def test_readme_md_blocks_run(sandboxes):
    repo, out = sandboxes(README_MD)
    assert "pytest -q tests" in out  # make test, dry run
    assert len(re.findall(r"Perplexity: [0-9.]+", out)) == 3, out[-3000:]  # eval-lm: converted, offline, full history
    # A block longer than the model's positions is skipped: 0 tokens scored, "Perplexity: 1.00".
    assert not re.search(r"Evaluated 0 tokens|Perplexity: 1\.00\b", out), out[-3000:]
    assert "Perplexity by distance from the stream start: 0-128 " in out, out[-3000:]  # docs/long_context.md
    assert re.search(r"^H-0\t\S+\tthe value of the \S", out, flags=re.M), out[-3000:]  # fairseq-interactive
    assert (repo / "t2r/checkpoint_best.pt").is_file() and (repo / "t2r_finetuned/checkpoint_last.pt").is_file()
    assert (repo / "distributed/checkpoint_last.pt").is_file() and (repo / "t2r_carried/checkpoint_best.pt").is_file()


def test_translation_readme_blocks_run(sandboxes):
    repo, out = sandboxes(TRANSLATION)
    assert (repo / "results/multi30k.json").is_file()  # the recipe wrote into the sandbox
    for model in ("teacher", "teacher_continued", "t2r_pretrain", "t2r_window", "t2r_window_distill"):
        assert (repo / model / "checkpoint_last.pt").is_file(), model
    assert len(re.findall(r'"name": "BLEU"', out)) == 2, out[-3000:]  # Multi30k and WMT14 sacreBLEU
    assert re.search(r"^D-0\t\S+\t", out, flags=re.M)  # fairseq-interactive translated the sentence
    assert re.search(r"BLEU4 = [0-9.]+", out)  # the compound-split BLEU script's fairseq-score


def test_language_model_readme_blocks_run(sandboxes):
    repo, out = sandboxes(LANGUAGE_MODEL)
    assert len(re.findall(r"Perplexity: [0-9.]+", out)) == 3, out[-3000:]  # teacher, T2R, full history
    for run in ("t2r_wiki103", "t2r_wiki103_offline", "t2r_wiki103_transfer", "t2r_wiki103_hybrid"):
        assert (repo / "checkpoints" / run / "checkpoint_last.pt").is_file(), run


def test_python_api_section_runs(sandboxes):
    """README.md's "Python API" code, in the sandbox its shell blocks filled, with the translation
    recipe's files beside them, in a fresh interpreter as a user would run it."""
    repo, _ = sandboxes(README_MD)
    translation, _ = sandboxes(TRANSLATION)
    for name in ("bin", "spm", "t2r_pretrain"):
        if not (repo / name).exists():
            (repo / name).symlink_to(translation / name)
    code = "\n".join(body for language, _, body in fenced_blocks(section(README_MD, "Python API"))
                     if language == "python")
    assert "import t2r_fairseq" in code.split("from fairseq")[0], "the plugin must be imported before fairseq"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert 1.0 < float(re.search(r"^perplexity ([0-9.]+)$", proc.stdout, flags=re.M).group(1)) < 1e5, proc.stdout
    assert any(line.startswith("the value of ") for line in lines), proc.stdout
    assert re.search(r"^new: \[.*feature_map.*\]$", proc.stdout, flags=re.M), proc.stdout
    assert (repo / "t2r_init.pt").is_file()

