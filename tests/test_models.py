"""Whole fairseq models (t2r_fairseq/models.py): token-by-token decoding with incremental_state
equals the full forward, and beam-search reordering of the state equals decoding the permuted
batch; for the language models and for the encoder-decoder t2r_transformer (sources padded on the
left, as fairseq pads them; T2R and softmax cross-attention)."""
import pytest
import torch

from helpers import TINY_LM, TINY_MT, TINY_WIKI103, build_model


def _tokens(batch, time, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, time), generator=g)


def _log_probs(model, tokens, **kwargs):
    out = model.decoder(tokens, **kwargs)
    return model.get_normalized_probs(out, log_probs=True)


def _incremental(model, tokens, state=None, start=0, **kwargs):
    """Log-probs of tokens[:, start:] decoded one token at a time (kwargs: encoder_out), and the state."""
    state = {} if state is None else state
    steps = [_log_probs(model, tokens[:, :t + 1], incremental_state=state, **kwargs)
             for t in range(start, tokens.size(1))]
    return torch.cat(steps, dim=1), state


def decoder_reordered(model, tokens, order, split):
    """Decode tokens[:, :split] token by token, reorder the state by `order` as beam search does, and
    decode the rest of the permuted batch; returns (those log-probs, the permuted batch's full forward's)."""
    with torch.no_grad():
        _, state = _incremental(model, tokens[:, :split])
        model.decoder.reorder_incremental_state_scripting(state, order)
        continued, _ = _incremental(model, tokens[order], state=state, start=split)
        return continued, _log_probs(model, tokens[order])[:, split:]


CASES = {
    "t2r": ("t2r_lm", TINY_LM),
    "elu": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "elu"]),
    "rfa": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "rfa"]),
    "hedgehog": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "hedgehog"]),
    "performer": ("t2r_lm", TINY_LM + ["--t2r-feature-map", "performer"]),
    "hybrid": ("t2r_lm", TINY_LM + ["--t2r-softmax-layers", "1"]),
    "wiki103_adaptive": ("t2r_lm_wiki103", TINY_WIKI103),
    "delta": ("t2r_lm", TINY_LM + ["--t2r-update", "delta"]),
    "gated_delta": ("t2r_lm", TINY_LM + ["--t2r-update", "delta", "--t2r-decay", "gated"]),
    "gated_delta_norm": ("t2r_lm", TINY_LM + ["--t2r-update", "delta_norm", "--t2r-decay", "gated"]),
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


@pytest.mark.parametrize("case", ["t2r", "hybrid", "gated_delta", "gated_delta_norm"])
def test_reorder_equals_decoding_permuted_batch(case):
    model, _ = build_model(*CASES[case])
    order = torch.tensor([2, 0, 3, 3])  # beam search also duplicates rows
    continued, reference = decoder_reordered(model, _tokens(4, 12, 60, seed=1), order, 6)
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


# -- the encoder-decoder model (t2r_transformer) --------------------------------------------------
MT_CASES = {
    "t2r": TINY_MT,
    "softmax_cross": TINY_MT + ["--t2r-cross-attention", "softmax"],
    "elu": TINY_MT + ["--t2r-feature-map", "elu"],
    "hybrid": TINY_MT + ["--t2r-softmax-layers", "0"],
    # cross-attention with its own map and size (self-attention keeps TINY_MT's t2r, 8)
    "cross_features": TINY_MT + ["--t2r-cross-feature-map", "hedgehog", "--t2r-cross-feature-dim", 16],
}


def _mt_model(case):
    return build_model("t2r_transformer", MT_CASES[case], task="translation")[0]


def _left_padded_sources(lengths, pad, eos, vocab=60, seed=0):
    """(batch, max_len) source tokens, each row padded on the left and ending in eos, as
    fairseq's LanguagePairDataset collates them (left_pad_source=True)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((len(lengths), max(lengths)), pad)
    for i, n in enumerate(lengths):
        src[i, -n:] = torch.randint(4, vocab, (n,), generator=g)
        src[i, -1] = eos
    return src, torch.tensor(lengths)


def _targets(batch, time, eos, seed=1):
    tgt = _tokens(batch, time, 60, seed)
    tgt[:, 0] = eos  # prev_output_tokens start with eos, as in fairseq
    return tgt


@pytest.mark.parametrize("case", MT_CASES)
def test_translation_incremental_decoding_equals_full_forward_with_left_padded_sources(case):
    model = _mt_model(case)
    d = model.decoder.dictionary
    src, lengths = _left_padded_sources([9, 5, 1, 7], d.pad(), d.eos())
    tgt = _targets(4, 70, d.eos())  # crosses a chunk boundary (64) of the parallel form
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        full = _log_probs(model, tgt, encoder_out=enc)
        steps, _ = _incremental(model, tgt, encoder_out=enc)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("case", MT_CASES)
def test_translation_sentence_in_padded_batch_equals_sentence_alone(case):
    """Source padding must not leak into cross-attention: what fairseq-generate's batch-size
    invariance rests on."""
    model = _mt_model(case)
    d = model.decoder.dictionary
    lengths = [9, 5, 1, 7]
    src, lens = _left_padded_sources(lengths, d.pad(), d.eos())
    tgt = _targets(4, 12, d.eos())
    with torch.no_grad():
        batch = _incremental(model, tgt, encoder_out=model.encoder(src, src_lengths=lens))[0]
        for i, n in enumerate(lengths):
            enc = model.encoder(src[i:i + 1, -n:], src_lengths=lens[i:i + 1])
            torch.testing.assert_close(batch[i:i + 1], _incremental(model, tgt[i:i + 1], encoder_out=enc)[0],
                                       rtol=1e-4, atol=1e-4)


# Beam search (2 sentences x beam 3, rows grouped by sentence) reorders rows within a sentence,
# duplicating some, and drops the rows of finished sentences. fairseq's softmax cross-attention
# relies on that (its cached source keys are left alone when the batch size is unchanged), and so
# does T2R's (its state over the source is the same for every beam of a sentence).
ORDERS = {"beam": [1, 1, 0, 5, 3, 3], "finished": [4, 4, 5]}


@pytest.mark.parametrize("case,order", [(c, o) for c in ("t2r", "softmax_cross", "hybrid", "cross_features")
                                        for o in ORDERS])
def test_translation_reorder_equals_decoding_permuted_batch(case, order):
    model = _mt_model(case)
    d = model.decoder.dictionary
    src, lengths = _left_padded_sources([6, 9], d.pad(), d.eos(), seed=2)
    rows = torch.arange(2).repeat_interleave(3)  # sentence of each of the 6 hypotheses
    tgt = _targets(6, 12, d.eos(), seed=3)
    order = torch.tensor(ORDERS[order])
    with torch.no_grad():
        enc = model.encoder.reorder_encoder_out(model.encoder(src, src_lengths=lengths), rows)
        _, state = _incremental(model, tgt[:, :6], encoder_out=enc)
        # What fairseq's SequenceGenerator does between steps: reorder the decoder state and the
        # encoder output alike.
        model.decoder.reorder_incremental_state_scripting(state, order)
        continued, _ = _incremental(model, tgt[order], state=state, start=6,
                                    encoder_out=model.encoder.reorder_encoder_out(enc, order))
        reference = _log_probs(model, tgt[order], encoder_out=model.encoder(
            src[rows[order]], src_lengths=lengths[rows[order]]))[:, 6:]
    torch.testing.assert_close(continued, reference, rtol=1e-4, atol=1e-4)


def test_translation_cross_attention_state_is_computed_once_per_sentence():
    """The cross-attention state over the source is cached at the first step: later steps must
    not depend on the encoder output any more (it is the RNN's constant-size memory)."""
    model = _mt_model("t2r")
    d = model.decoder.dictionary
    src, lengths = _left_padded_sources([6, 4], d.pad(), d.eos())
    tgt = _targets(2, 5, d.eos())
    with torch.no_grad():
        enc = model.encoder(src, src_lengths=lengths)
        reference, _ = _incremental(model, tgt, encoder_out=enc)
        state = {}
        _log_probs(model, tgt[:, :1], encoder_out=enc, incremental_state=state)
        garbage = {**enc, "encoder_out": [torch.randn_like(enc["encoder_out"][0])]}
        rest, _ = _incremental(model, tgt, state=state, start=1, encoder_out=garbage)
    torch.testing.assert_close(rest, reference[:, 1:], rtol=1e-4, atol=1e-4)
