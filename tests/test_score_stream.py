"""Unbounded-context scoring: carrying the state across blocks is exact."""
import pytest
import torch

from helpers import TINY_LM, build_model


def _stream(n=300, vocab=60, seed=0):
    return torch.randint(4, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def test_block_size_does_not_change_scores_without_positions():
    from t2r_fairseq.score_stream import score

    # Without position embeddings the block boundaries are invisible to an exact RNN.
    model, _ = build_model("t2r_lm", TINY_LM + ["--no-token-positional-embeddings"])
    stream = _stream()
    with torch.no_grad():
        before = model(stream[:50].view(1, -1))[0]
    whole, n = score(model, stream, eos=2, block=10_000, streams=1)
    for block, streams in ((7, 1), (64, 1), (50, 3)):
        nll, count = score(model, stream, eos=2, block=block, streams=streams)
        if streams == 1:
            assert count == n and nll == pytest.approx(whole, rel=1e-5)
        else:  # three independent streams: same token count, different contexts
            assert count == n and nll != pytest.approx(whole, rel=1e-9)
    # Scoring leaves nothing behind: a plain forward afterwards sees no earlier block.
    with torch.no_grad():
        torch.testing.assert_close(model(stream[:50].view(1, -1))[0], before, rtol=0, atol=0)


def test_blocks_read_through_the_incremental_path_equal_one_long_forward():
    """Each block continues the state the previous block left in incremental_state (the
    multi-token incremental call), so blocks score exactly like one forward over the whole
    stream, and unlike blocks that start afresh."""
    from t2r_fairseq.attention import prefill

    model, _ = build_model("t2r_lm", TINY_LM + ["--no-token-positional-embeddings"])
    x = _stream(150).view(1, -1)
    with torch.no_grad():
        state = {}
        blocks = torch.cat([prefill(model.decoder, x[:, s:s + 40], state)[0] for s in range(0, 150, 40)], dim=1)
        full = model(x)[0]
        fresh = model(x[:, 40:80])[0]
    torch.testing.assert_close(blocks, full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fresh, full[:, 40:80], atol=1e-3)


def test_hybrid_model_is_refused():
    from t2r_fairseq.score_stream import score

    model, _ = build_model("t2r_lm", TINY_LM + ["--t2r-softmax-layers", "0"])
    with pytest.raises(ValueError, match="every decoder layer to be T2R"):
        score(model, _stream(), eos=2, block=10, streams=1)
