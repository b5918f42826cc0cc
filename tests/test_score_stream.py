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
    whole, n = score(model, stream, eos=2, block=10_000, streams=1)
    for block, streams in ((7, 1), (64, 1), (50, 3)):
        nll, count = score(model, stream, eos=2, block=block, streams=streams)
        if streams == 1:
            assert count == n and nll == pytest.approx(whole, rel=1e-5)
        else:  # three independent streams: same token count, different contexts
            assert count == n and nll != pytest.approx(whole, rel=1e-9)
    # The carry switch is off again afterwards.
    assert all(layer.self_attn.carried_state is None for layer in model.decoder.layers)


def test_carrying_state_differs_from_independent_blocks():
    from t2r_fairseq.score_stream import carried_state

    model, _ = build_model("t2r_lm", TINY_LM + ["--no-token-positional-embeddings"])
    x = _stream(40).view(1, -1)
    with torch.no_grad():
        fresh = model(x[:, 20:])[0]
        with carried_state(model):
            model(x[:, :20])
            carried = model(x[:, 20:])[0]
        full = model(x)[0][:, 20:]
    torch.testing.assert_close(carried, full, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(fresh, full, atol=1e-3)


def test_hybrid_model_is_refused():
    from t2r_fairseq.score_stream import carried_state

    model, _ = build_model("t2r_lm", TINY_LM + ["--t2r-softmax-layers", "0"])
    with pytest.raises(ValueError, match="every decoder layer to be T2R"):
        with carried_state(model):
            pass
