"""The paper-scale recipes cannot run here (downloads, GPUs), but their command lines can be
checked: every `--flag` of every CLI command in the fenced bash blocks of
examples/language_model/README.md must be one the installed CLI accepts.

fairseq's own `--help` prints before the task, model, criterion, optimizer and scheduler options
are added (argparse exits on `--help` during fairseq's first parsing pass), so for fairseq's CLIs
the help checked here is that of the fully assembled parser: the one fairseq builds from the
command's own --user-dir, --task, --arch, --criterion, --optimizer and --lr-scheduler. The command
is then also parsed for real, so a bad value (a choice that does not exist) fails too. The
plugin's own CLIs (t2r-convert, t2r-eval-stream) are asked for `--help` as a user would."""
import re
import shlex
import subprocess

import pytest

from helpers import BIN, ROOT

RECIPE = ROOT / "examples" / "language_model" / "README.md"
FAIRSEQ_CLIS = ("fairseq-preprocess", "fairseq-train", "fairseq-eval-lm")
PLUGIN_CLIS = ("t2r-convert", "t2r-eval-stream")
FLAG = re.compile(r"--[A-Za-z0-9][A-Za-z0-9_-]*")


def bash_blocks(text):
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def recipe_commands(path=RECIPE):
    """(cli, argv) for each CLI command in the file's bash blocks, with its shell variables
    (NAME=... lines, also multi-line quoted ones) expanded and split as bash would."""
    env, commands = {}, []
    for block in bash_blocks(path.read_text()):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
            words = shlex.split(line, comments=True)
            assignment = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)=(.*)", words[0], flags=re.S) if words else None
            if assignment and len(words) == 1:
                env[assignment.group(1)] = assignment.group(2)
                continue
            while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=x command ...
                words = words[1:]
            if words and words[0] in FAIRSEQ_CLIS + PLUGIN_CLIS:
                commands.append((words[0], words[1:]))
    return commands


def flags(argv):
    return {word.split("=", 1)[0] for word in argv if FLAG.fullmatch(word.split("=", 1)[0])}


def fairseq_parser(cli, argv):
    """The parser fairseq's CLI builds for this command line, with every option group added."""
    from fairseq import options

    if cli == "fairseq-preprocess":
        parser = options.get_preprocessing_parser()
        return parser, lambda: parser.parse_args(argv)

    def new_parser():
        return options.get_training_parser() if cli == "fairseq-train" else options.get_eval_lm_parser()

    parser = new_parser()
    options.parse_args_and_arch(parser, argv, parse_known=True)  # adds task/model/... options
    # A fresh parser for the real parse: fairseq's second pass would add the groups twice.
    return parser, lambda: options.parse_args_and_arch(new_parser(), argv)


COMMANDS = recipe_commands()


def test_recipe_has_the_commands_it_documents():
    clis = [cli for cli, _ in COMMANDS]
    for cli in FAIRSEQ_CLIS + PLUGIN_CLIS:
        assert cli in clis, f"{RECIPE.name}: no {cli} command found in its bash blocks"
    train = [set(argv) for cli, argv in COMMANDS if cli == "fairseq-train"]
    assert any({"--convert-from", "t2r_language_modeling", "t2r_lm_wiki103"} <= words for words in train)
    assert any("t2r_attention_transfer" in words for words in train)
    assert any("--t2r-softmax-layers" in words for words in train)


@pytest.mark.parametrize("cli,argv", [c for c in COMMANDS if c[0] in FAIRSEQ_CLIS],
                         ids=lambda c: c if isinstance(c, str) else "")
def test_fairseq_command_flags_exist(cli, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # --user-dir t2r_fairseq is relative to the repository root
    parser, parse = fairseq_parser(cli, argv)
    known = set(FLAG.findall(parser.format_help()))
    unknown = sorted(flags(argv) - known)
    assert not unknown, f"{cli}: not in its --help: {unknown}"
    try:
        parse()
    except SystemExit as e:
        pytest.fail(f"{cli} rejects the recipe's command line (exit {e.code}): {shlex.join(argv)}")


@pytest.mark.parametrize("cli", PLUGIN_CLIS)
def test_plugin_command_flags_exist(cli):
    argvs = [argv for c, argv in COMMANDS if c == cli]
    out = subprocess.run([str(BIN / cli), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    known = set(FLAG.findall(out.stdout))
    for argv in argvs:
        unknown = sorted(flags(argv) - known)
        assert not unknown, f"{cli}: not in its --help: {unknown}"


def test_flag_check_catches_a_bad_flag(tmp_path):
    """The check itself: a misspelled option in a recipe is reported."""
    recipe = tmp_path / "README.md"
    recipe.write_text("```bash\nOPT=\"--max-tokens 3072 \\\n    --no-such-option 1\"\n"
                      "fairseq-train data --user-dir t2r_fairseq --task t2r_language_modeling "
                      "--arch t2r_lm_wiki103 $OPT\n```\n")
    [(cli, argv)] = recipe_commands(recipe)
    assert cli == "fairseq-train" and "--max-tokens" in argv
    parser, _ = fairseq_parser(cli, [a if a != "t2r_fairseq" else str(ROOT / "t2r_fairseq") for a in argv])
    assert flags(argv) - set(FLAG.findall(parser.format_help())) == {"--no-such-option"}
