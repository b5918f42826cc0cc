"""Whole fairseq decoders: token-by-token decoding with incremental_state equals the full forward,
and beam-search reordering of the state equals decoding the permuted batch."""
import pytest
import torch

from helpers import TINY_LM, TINY_WIKI103, build_model


def _tokens(batch, time, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, time), generator=g)


def _log_probs(model, tokens, **kwargs):
    out = model.decoder(tokens, **kwargs)
    return model.get_normalized_probs(out, log_probs=True)


def _incremental(model, tokens, state=None, start=0):
    state = {} if state is None else state
    steps = [_log_probs(model, tokens[:, :t + 1], incremental_state=state) for t in range(start, tokens.size(1))]
    return torch.cat(steps, dim=1), state


CASES = {
    "t2r": ("t2r_lm", TINY_LM),
    "elu": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "elu"]),
    "rfa": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "rfa"]),
    "hedgehog": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "hedgehog"]),
    "performer": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "performer"]),
    "hybrid": ("t2r_lm", TINY_LM + ["--t2r-softmax-layers", "1"]),
    "wiki103_adaptive": ("t2r_lm_wiki103", TINY_WIKI103),
}


@pytest.mark.parametrize("case", CASES)
def test_incremental_decoding_equals_full_forward(case):
    arch, extra = CASES[case]
    model, _ = build_model(arch, extra)
    tokens = _tokens(3, 70, 60)  # crosses a chunk boundary (64)
    with torch.no_grad():
        full = _log_probs(model, tokens)
        steps, _ = _incremental(model, tokens)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_incremental_decoding_under_autograd_matches_too():
    # With grad enabled the state is not updated in place; values must not change.
    model, _ = build_model("t2r_lm", TINY_LM)
    tokens = _tokens(2, 10, 60)
    full = _log_probs(model, tokens)
    steps, _ = _incremental(model, tokens)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", ["t2r", "hybrid"])
def test_reorder_equals_decoding_permuted_batch(case):
    arch, extra = CASES[case]
    model, _ = build_model(arch, extra)
    tokens = _tokens(4, 12, 60, seed=1)
    order = torch.tensor([2, 0, 3, 3])  # beam search also duplicates rows
    with torch.no_grad():
        _, state = _incremental(model, tokens[:, :6])
        model.decoder.reorder_incremental_state_scripting(state, order)
        continued, _ = _incremental(model, tokens[order], state=state, start=6)
        reference = _log_probs(model, tokens[order])[:, 6:]
    torch.testing.assert_close(continued, reference, rtol=1e-4, atol=1e-4)


def test_state_size_is_constant_in_prefix_length():
    model, _ = build_model("t2r_lm", TINY_LM)
    tokens = _tokens(1, 40, 60)
    sizes = []
    with torch.no_grad():
        state = {}
        for t in range(tokens.size(1)):
            _log_probs(model, tokens[:, :t + 1], incremental_state=state)
            sizes.append(sum(v.numel() for buf in state.values() for v in buf.values()))
    assert len(set(sizes)) == 1 and sizes[0] > 0


def test_key_padding_positions_contribute_nothing():
    # Left padding (as in generation with prefixes): outputs of real tokens must not see pads.
    model, _ = build_model("t2r_lm", TINY_LM)
    pad = model.decoder.padding_idx
    tokens = _tokens(1, 8, 60)
    padded = torch.cat([torch.full((1, 3), pad), tokens], dim=1)
    attn = model.decoder.layers[0].self_attn
    x = torch.randn(8, 1, 32)
    xp = torch.cat([torch.randn(3, 1, 32), x], dim=0)
    with torch.no_grad():
        out, _ = attn(x, x, x)
        out_p, _ = attn(xp, xp, xp, key_padding_mask=padded.eq(pad))
    torch.testing.assert_close(out_p[3:], out, rtol=1e-5, atol=1e-5)


def test_architectures_have_t2r_twins():
    from fairseq.models import ARCH_MODEL_REGISTRY

    import t2r_fairseq  # noqa: F401
    from t2r_fairseq.models import twin_architecture_name

    base = [a for a, cls in ARCH_MODEL_REGISTRY.items()
            if cls is ARCH_MODEL_REGISTRY["transformer_lm"] or cls is ARCH_MODEL_REGISTRY["transformer"]]
    assert {"transformer_lm_wiki103", "transformer_lm_gpt2_small", "transformer_wmt_en_de"} <= set(base)
    for arch in base:
        assert twin_architecture_name(arch) in ARCH_MODEL_REGISTRY, arch


def test_twin_keeps_base_defaults_and_adds_t2r_defaults():
    _, args = build_model("t2r_lm_wiki103", TINY_WIKI103)
    assert args.adaptive_input and args.tie_adaptive_weights and args.t2r_feature_map == "t2r"
    assert args.t2r_feature_dim == 8
