"""t2r_truncated_bptt_lm: streams cut into batches that predict every token once, a model that
carries its recurrent state from batch to batch exactly (and resets it where it must), and the
user's commands: fairseq-train with --convert-from, fairseq-eval-lm with full history."""
import math
import re
import sys

import pytest
import torch

from helpers import MODEL, ROOT, TINY_LM, TRAIN, USER_DIR, build_model, run


def _batches(tokens, rows, block, shards=1):
    from t2r_fairseq.streams import StreamBatches

    return [StreamBatches(tokens, rows=rows, block=block, shard_id=s, num_shards=shards, eos=2, pad=1)
            for s in range(shards)]


@pytest.mark.parametrize("n,rows,block,shards", [(100, 3, 7, 1), (64, 2, 8, 2), (5, 4, 3, 1), (1, 1, 4, 1)])
def test_every_token_is_a_target_once_and_inputs_are_the_tokens_before(n, rows, block, shards):
    tokens = torch.arange(4, 4 + n)
    targets, inputs = [], []
    for dataset in _batches(tokens, rows, block, shards):
        assert len(dataset.sizes) == len(dataset)
        items = [dataset[i] for i in range(len(dataset))]
        assert all(x.shape == y.shape and x.size(0) == rows and x.size(1) <= block for _, x, y in items)
        targets.append(torch.cat([y for _, _, y in items], dim=1))
        inputs.append(torch.cat([x for _, x, _ in items], dim=1))
    targets, inputs = torch.cat(targets), torch.cat(inputs)  # (all rows, row length): rows in stream order
    real = targets.ne(1)
    assert targets[real].tolist() == tokens.tolist()  # each token once, in order
    assert inputs[real].tolist() == [2] + tokens[:-1].tolist()  # predicted from the token before
    # Padding only at the end of the last stream, and nowhere an input to a real target.
    assert real.flatten().tolist() == [True] * n + [False] * (real.numel() - n)
    assert inputs.eq(1).equal(~real)


def _model(extra=()):
    model, _ = build_model("t2r_lm", TINY_LM + ["--no-token-positional-embeddings", *extra])
    return model


@pytest.mark.parametrize("extra", [[], ["--t2r-window", 8]])
def test_batches_of_a_stream_equal_one_long_forward(extra):
    model = _model(extra)
    x = torch.randint(4, 60, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)[0]
        blocks = torch.cat([model(x[:, s:s + 32], stream_block=n)[0] for n, s in enumerate(range(0, 90, 32))], dim=1)
    torch.testing.assert_close(blocks, full, rtol=1e-4, atol=1e-4)


def test_state_resets_at_block_0_and_new_batch_shape_and_train_and_eval_keep_their_own():
    model = _model()
    x = torch.randint(4, 60, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fresh = model(x)[0]
        torch.testing.assert_close(model(x, stream_block=0)[0], fresh)
        assert not torch.allclose(model(x, stream_block=1)[0], fresh, atol=1e-4)  # continues the stream
        torch.testing.assert_close(model(x)[0], fresh)  # no block: a plain forward, whatever was carried
        torch.testing.assert_close(model(x, stream_block=0)[0], fresh)  # starts over
        torch.testing.assert_close(model(x[:1], stream_block=1)[0], fresh[:1])  # another batch size: starts over
        model.train()  # (no dropout in TINY_LM) training mode has its own, empty, state
        torch.testing.assert_close(model(x, stream_block=1)[0], fresh, rtol=1e-5, atol=1e-5)


def test_gradients_stay_inside_a_batch():
    model = _model()
    model.train()
    x = torch.randint(4, 60, (2, 16), generator=torch.Generator().manual_seed(2))
    model(x[:, :8], stream_block=0)[0].sum().backward()  # the first batch's graph is gone after its backward
    model.zero_grad()
    model(x[:, 8:], stream_block=1)[0].sum().backward()  # would raise if the carried state still held that graph
    assert all(p.grad is not None for p in model.decoder.layers[0].self_attn.parameters())


def test_padding_at_a_stream_end_enters_no_state():
    model = _model()
    x = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    padded = x.clone()
    padded[1, 8:] = 1  # the second stream ended after 8 tokens
    with torch.no_grad():
        model(padded, stream_block=0)
        state_padded = model._streams[False]
        model(x[:, :8], stream_block=0)
        state_short = model._streams[False]
    for key in state_short:
        for name, t in state_short[key].items():
            torch.testing.assert_close(state_padded[key][name][1], t[1], rtol=1e-5, atol=1e-6)


# -- the user's commands ----------------------------------------------------------------------
STREAM = ["--task", "t2r_truncated_bptt_lm", "--tokens-per-sample", 32, "--batch-size", 4]


def _train(lm_workdir, save, extra=(), check=True):
    train = [a for a in TRAIN if a not in ("--tokens-per-sample", 64, "--max-tokens", 512)]
    return run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, *STREAM, "--convert-from",
                lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL, *train,
                "--max-update", 6, "--save-dir", save, "--log-interval", 1, *extra], check=check)


@pytest.fixture(scope="module")
def carried_run(lm_workdir):
    save = lm_workdir / "carried"
    return save, _train(lm_workdir, save)


def test_carried_state_training_converts_and_trains(carried_run):
    save, proc = carried_run
    log = proc.stdout + proc.stderr
    assert "converted" in log and "num_updates=6" in log.replace(" ", "")
    losses = [float(x) for x in re.findall(r"train_inner \|.*? loss=([0-9.]+)", log)]
    assert len(losses) == 6 and all(0 < x < 20 for x in losses)
    assert (save / "checkpoint_last.pt").exists()


def _eval(lm_workdir, checkpoint, *extra):
    proc = run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path", checkpoint, "--gen-subset",
                "valid", "--cpu", *map(str, extra)])
    text = proc.stdout + proc.stderr
    tokens = int(re.search(r"Evaluated ([0-9,]+) tokens", text).group(1).replace(",", ""))
    return tokens, float(re.search(r"Perplexity: ([0-9.]+)", text).group(1))


def test_eval_lm_scores_every_token_with_its_whole_history(lm_workdir, carried_run):
    save, _ = carried_run
    checkpoint = save / "checkpoint_last.pt"
    windowed = _eval(lm_workdir, checkpoint, "--tokens-per-sample", 64, "--context-window", 32)
    one = _eval(lm_workdir, checkpoint, "--task", "t2r_truncated_bptt_lm", "--tokens-per-sample", 32)
    three = _eval(lm_workdir, checkpoint, "--task", "t2r_truncated_bptt_lm", "--tokens-per-sample", 32,
                  "--batch-size", 3)
    assert one[0] == three[0] == windowed[0]  # the same tokens, each scored once
    assert 1 < one[1] < 1e5 and one[1] != three[1]  # three streams: other histories


def _by_distance(text):
    """{bucket: (ppl, n)} from the line --distance-buckets adds."""
    line, = re.findall(r"Perplexity by distance from the stream start: (.*)", text)
    return {label: (float(ppl), int(n.replace(",", ""))) for label, ppl, n in re.findall(r"(\S+) (\S+) \(n=([0-9,]+)\)", line)}


def test_eval_lm_logs_perplexity_by_distance_from_the_stream_start(lm_workdir, carried_run):
    save, _ = carried_run
    stream = ["--task", "t2r_truncated_bptt_lm", "--tokens-per-sample", 32, "--batch-size", 2]
    outputs = []
    for extra in ([], ["--softmax-batch", 37]):  # 37: the scorer's softmax in flat pieces that straddle rows
        proc = run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                    "--gen-subset", "valid", "--cpu", *map(str, stream), "--distance-buckets", "16,40,100", *extra])
        outputs.append(proc.stdout + proc.stderr)
    text = outputs[0]
    tokens = int(re.search(r"Evaluated ([0-9,]+) tokens", text).group(1).replace(",", ""))
    loss, ppl = map(float, re.search(r"Loss \(base 2\): ([0-9.]+), Perplexity: ([0-9.]+)", text).groups())
    buckets = _by_distance(text)
    assert list(buckets) == ["0-16", "16-40", "40-100", "100+"] and all(n > 0 for _, n in buckets.values())
    assert sum(n for _, n in buckets.values()) == tokens
    # Token-weighted, the buckets give the overall loss back (their ppls are printed to 0.01).
    again = sum(n * math.log2(p) for p, n in buckets.values()) / tokens
    assert abs(again - loss) < 1e-3, (again, loss)
    assert _by_distance(outputs[1]) == buckets


@pytest.mark.parametrize("edges", ["512,128", "128,128", "0,512", "-5", "128,,512", "2k"])
def test_bad_distance_buckets_are_refused_in_one_line(edges):
    """As the task's constructor parses them; fairseq's CLIs print a T2RUsageError as its one line."""
    from t2r_fairseq.errors import T2RUsageError
    from t2r_fairseq.streams import parse_distance_buckets

    with pytest.raises(T2RUsageError, match=f"^--distance-buckets {edges}: give increasing positive token counts"):
        parse_distance_buckets(edges)
    assert parse_distance_buckets("128,512,2048") == (128, 512, 2048)


def _recipe():
    sys.path.insert(0, str(ROOT))  # examples/ is run from the checkout, not installed
    from examples.language_model import wikitext2

    return wikitext2


@pytest.mark.parametrize("n,streams", [(100, 8), (9, 8), (8, 8), (3, 8), (50, 3)])
def test_the_recipes_windowed_distances_are_the_stream_tasks(n, streams):
    """Scored in split order, token g sits in the stream task's layout at a distance from its stream's start
    (its block * block length + its column) that the recipe's mapping must give too."""
    block = 4
    (dataset,) = _batches(torch.arange(10, 10 + n), rows=streams, block=block)
    distance = {}
    for i in range(len(dataset)):
        _, _, targets = dataset[i]
        for (row, column) in targets.ne(1).nonzero().tolist():
            distance[targets[row, column].item() - 10] = i * block + column
    assert _recipe().stream_distances(n, streams) == [distance[g] for g in range(n)]
    scores = [-math.log(2 + g % 3) for g in range(n)]  # bucketed by those distances, edges 2 and 5
    expected = {}
    for g, d in enumerate(_recipe().stream_distances(n, streams)):
        expected.setdefault("0-2" if d < 2 else "2-5" if d < 5 else "5+", []).append(-scores[g])
    got = _recipe().windowed_by_distance(scores, streams, edges=(2, 5))
    assert {k: (round(p, 9), c) for k, (p, c) in got.items()} == {
        k: (round(math.exp(sum(v) / len(v)), 9), len(v)) for k, v in expected.items()}


def test_windowed_word_probs_are_the_splits_tokens_in_order(lm_workdir):
    """fairseq-eval-lm --context-window --output-word-probs: by block id, the tokens it prints are the
    split's, first token included, each once (the context's targets are padding and not printed)."""
    from fairseq.data import Dictionary, data_utils

    proc = run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path",
                lm_workdir / "softmax/checkpoint_last.pt",
                "--gen-subset", "valid", "--tokens-per-sample", 64, "--context-window", 32, "--max-tokens", 256,
                "--output-word-probs", "--cpu"])
    text = proc.stdout + proc.stderr
    words = _recipe().word_probs(text)
    dictionary = Dictionary.load(str(lm_workdir / "bin/dict.txt"))
    lines = data_utils.load_indexed_dataset(str(lm_workdir / "bin/valid"), dictionary)
    assert [token for token, _ in words] == [dictionary[t] for t in torch.cat(list(lines)).tolist()]
    ppl = float(re.search(r"Perplexity: ([0-9.]+)", text).group(1))
    assert abs(math.exp(-sum(score for _, score in words) / len(words)) - ppl) < 0.01


def test_a_carried_state_checkpoint_loads_without_a_task(lm_workdir, carried_run):
    """As the hub interface and fairseq's loaders load it: the task is rebuilt from the checkpoint."""
    save, _ = carried_run
    code = ("import t2r_fairseq, torch; from fairseq import checkpoint_utils; "
            f"models, _ = checkpoint_utils.load_model_ensemble([{str(save / 'checkpoint_last.pt')!r}]); "
            "out = models[0].eval()(torch.tensor([[5, 6, 7]]))[0]; print('logits', tuple(out.shape))")
    proc = run([sys.executable, "-c", code])
    assert re.search(r"^logits \(1, 3, \d+\)$", proc.stdout, flags=re.M), proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize("task", [None, "language_modeling"])
def test_the_hub_scores_and_samples_a_carried_state_checkpoint_without_carrying_state(lm_workdir, carried_run,
                                                                                      task):
    """The README's hub code on a checkpoint trained with --task t2r_truncated_bptt_lm (with and without
    task= passed): .score twice gives the same scores (no state carried between calls) and .sample works."""
    save, _ = carried_run
    extra = "" if task is None else f", task={task!r}"
    code = ("import t2r_fairseq; from fairseq.models.transformer_lm import TransformerLanguageModel as LM\n"
            f"lm = LM.from_pretrained({str(save)!r}, 'checkpoint_last.pt', "
            f"data_name_or_path={str(lm_workdir / 'bin')!r}{extra}).eval()\n"
            "first, again = (lm.score('the value of the')['positional_scores'] for _ in range(2))\n"
            "print('same', bool((first == again).all()), len(first))\n"
            "print('sample', lm.sample('the value of', beam=1, sampling=True, sampling_topk=5, max_len_b=5))\n")
    proc = run([sys.executable, "-c", code])
    assert re.search(r"^same True [345]$", proc.stdout, flags=re.M), proc.stdout + proc.stderr[-2000:]
    assert re.search(r"^sample the value of\b", proc.stdout, flags=re.M), proc.stdout


@pytest.mark.parametrize("bad,message", [
    (["--arch", "transformer_lm_wiki103"], "needs a T2R language model"),
    (["--arch", "t2r_lm_wiki103", "--t2r-softmax-layers", "1"], "no --t2r-softmax-layers"),
])
def test_models_that_cannot_carry_state_are_refused_in_one_line(lm_workdir, bad, message):
    proc = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, *STREAM, *MODEL, *bad,
                *[a for a in TRAIN if a not in ("--tokens-per-sample", 64, "--max-tokens", 512)], "--max-update", 1,
                "--save-dir", lm_workdir / "refused"], check=False)
    assert proc.returncode != 0 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_blocks_longer_than_the_positions_are_refused(lm_workdir, carried_run):
    save, _ = carried_run
    proc = run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path", save / "checkpoint_last.pt",
                "--task", "t2r_truncated_bptt_lm", "--tokens-per-sample", 4096, "--cpu"], check=False)
    assert proc.returncode != 0 and "--tokens-per-sample 4096 is longer" in proc.stderr.strip().splitlines()[-1]


# -- what carrying state is for ---------------------------------------------------------------
KEYS, FILLERS, REPEAT = torch.arange(4, 20), torch.arange(20, 24), 24


def _documents(n, length, generator):
    """A key, filler, REPEAT, the key again: the last token is predictable only from the first."""
    key = KEYS[torch.randint(len(KEYS), (n, 1), generator=generator)]
    filler = FILLERS[torch.randint(len(FILLERS), (n, length - 3), generator=generator)]
    return torch.cat([key, filler, torch.full((n, 1), REPEAT), key], dim=1)


def _recall_after_training(carry, block=8, steps=400):
    """Train on documents of one block and of three (the key two blocks before its repeat), in
    batches of blocks; return how often the key is recalled at the end of three-block documents."""
    torch.set_num_threads(1)  # a tiny model: threads only wait for each other
    model, _ = build_model("t2r_lm", ["--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim",
                                      64, "--decoder-attention-heads", 2, "--dropout", 0, "--t2r-feature-dim", 8])
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)

    def read(docs):  # the documents block by block: each a batch, as the stream task feeds them
        inputs = torch.cat([torch.full((docs.size(0), 1), 2), docs[:, :-1]], dim=1)
        for n, start in enumerate(range(0, docs.size(1), block)):  # block 0: a new set of streams
            yield model(inputs[:, start:start + block], stream_block=n if carry else None)[0], \
                docs[:, start:start + block]

    model.train()
    for step in range(steps):
        for logits, targets in read(_documents(16, 3 * block if step % 2 else block, g)):
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        docs = _documents(256, 3 * block, torch.Generator().manual_seed(9))
        *_, (logits, _) = read(docs)
    return logits[:, -1].argmax(-1).eq(docs[:, -1]).float().mean().item()


def test_carried_state_learns_a_dependency_across_three_blocks_that_independent_blocks_cannot():
    # Chance is 1/16: independent blocks never see the key; the carried state keeps it.
    assert _recall_after_training(carry=True) > 0.8
    assert _recall_after_training(carry=False) < 0.2
