"""--history-blocks: training blocks start from the state of the text just before them (history.py):
the batches carry that text exactly, the model reads it into its state, and the user's commands."""
import re

import pytest
import torch

from helpers import MODEL, TINY_LM, TRAIN, USER_DIR, build_model, run


def _task(lm_workdir, *extra):
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(lm_workdir / "bin"), "--user-dir", USER_DIR, "--task", "t2r_language_modeling", "--arch",
        "t2r_lm_wiki103", "--tokens-per-sample", "16", "--seed", "5", *map(str, extra)])
    task = tasks.setup_task(convert_namespace_to_omegaconf(args).task)
    task.load_dataset("train")
    return task.datasets["train"]


def test_each_rows_history_is_the_text_before_its_block(lm_workdir):
    plain, history = _task(lm_workdir), _task(lm_workdir, "--history-blocks", 3)
    from fairseq.data import data_utils

    orders = []
    for dataset in (plain, history):
        with data_utils.numpy_seed(7):  # as fairseq's batch iterator shuffles them
            orders.append(dataset.ordered_indices().tolist())
    assert orders[0] == orders[1]  # the same batches as without
    seen = set()
    for ids in ([0, 1], [5, 9, 40], [2, 30, 31, 7], [100, 101], [60, 61, 62, 63]):
        batch = history.collater([history[i] for i in ids])
        reference = plain.collater([plain[i] for i in ids])
        assert batch["net_input"]["src_tokens"].equal(reference["net_input"]["src_tokens"])
        assert batch["target"].equal(reference["target"])
        past = batch["net_input"]["history_tokens"]
        k = past.size(1)
        assert past.shape == (len(ids), k, 16) and k <= min(3, min(ids))
        assert k == history.history_length(ids)  # reproducible: a resumed run reads the same
        seen.add(k)
        for row, i in enumerate(ids):
            # fairseq's own blocks i-k..i-1, in order, are what the row reads first.
            before = torch.cat([plain[j]["source"] for j in range(i - k, i)]) if k else torch.empty(0).long()
            assert past[row].flatten().equal(before)
    assert len(seen) > 1  # k varies from batch to batch


def _model():
    model, _ = build_model("t2r_lm", TINY_LM + ["--no-token-positional-embeddings"])
    return model


def test_reading_the_history_first_equals_one_forward_over_the_whole_text():
    model = _model()
    x = torch.randint(4, 60, (2, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)[0]
        after = model(x[:, 64:], history_tokens=x[:, :64].view(2, 2, 32))[0]
        empty = model(x[:, 64:], history_tokens=x.new_zeros(2, 0, 32))[0]
    torch.testing.assert_close(after, full[:, 64:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(empty, model(x[:, 64:])[0])  # k = 0: the plain forward


def test_gradients_come_from_the_block_alone():
    model = _model()
    model.train()
    x = torch.randint(4, 60, (2, 48), generator=torch.Generator().manual_seed(1))
    embed = model.decoder.embed_tokens.weight
    model(x[:, 32:], history_tokens=x[:, :32].view(2, 1, 32))[0].sum().backward()
    # A token that occurs only in the history gets no gradient through its embedding row.
    only_before = sorted(set(x[:, :32].flatten().tolist()) - set(x[:, 32:].flatten().tolist()))
    assert only_before and embed.grad[only_before].abs().sum() == 0
    assert embed.grad[x[:, 32:].flatten()].abs().sum() > 0


def _train(lm_workdir, save, *extra, check=True):
    return run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
                "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL,
                *TRAIN, "--max-update", 4, "--log-interval", 1, "--save-dir", save, *extra], check=check)


def test_fairseq_train_reads_the_history_and_trains(lm_workdir):
    proc = _train(lm_workdir, lm_workdir / "history", "--history-blocks", 2)
    log = proc.stdout + proc.stderr
    assert "converted" in log and "up to 2 blocks of text before each training block" in log
    losses = [float(x) for x in re.findall(r"train_inner \|.*? loss=([0-9.]+)", log)]
    assert len(losses) == 4 and all(0 < x < 20 for x in losses)
    assert (lm_workdir / "history/checkpoint_last.pt").exists()


@pytest.mark.parametrize("bad,message", [
    (["--history-blocks", -1], "--history-blocks -1: give how many blocks"),
    (["--history-blocks", 2, "--sample-break-mode", "eos"], "use --sample-break-mode none"),
    (["--history-blocks", 2, "--add-bos-token"], "--add-bos-token starts every block with <s>"),
    (["--history-blocks", 2, "--t2r-softmax-layers", "1"], "with no --t2r-softmax-layers"),
    (["--history-blocks", 2, "--criterion", "t2r_attention_transfer"], "drop one of them"),
])
def test_history_that_cannot_be_read_is_refused_in_one_line(lm_workdir, bad, message):
    proc = _train(lm_workdir, lm_workdir / "refused", *bad, check=False)
    assert proc.returncode != 0 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
