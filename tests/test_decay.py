"""Decay on the state (--t2r-decay): S_t = g_t S_{t-1} + phi(k_t) v_t^T, z_t = g_t z_{t-1} + phi(k_t).

The math: every form (chunked, step by step, the naive quadratic reference) agrees in values and
gradients (float64), a sequence read in pieces equals it read at once (with padding too), and 16k
tokens of strong decay stay finite and exact in float32 and bfloat16. The module and whole
decoders: decoding token by token equals the full forward for every decay, beam reordering equals
the permuted batch, padding never enters the state, and conversion names the decay's tensors."""
import pytest
import torch

from helpers import MODEL, TINY_LM, TINY_LM_SOFTMAX, TRAIN, USER_DIR, build_model, run, save_checkpoint
from t2r_fairseq import linear_attention as la
from t2r_fairseq.attention import T2RSelfAttention
from t2r_fairseq.decay import DECAYS
from test_attention import _decode, decode_reordered, outputs_and_gradients
from test_linear_attention import _inputs, _state
from test_models import _incremental, _log_probs, _tokens, decoder_reordered

DECAYING = [d for d in DECAYS if d != "none"]


def _log_gates(batch, heads, time, kind, seed=2, dtype=torch.float64):
    """Per position: strong and varied (g from e^-3 to 1); per head: a constant broadcast (1, heads, 1)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "position":
        return -3 * torch.rand(batch, heads, time, generator=g, dtype=dtype)
    return -torch.rand(1, heads, 1, generator=g, dtype=dtype)


# -- the math ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("time", [1, 63, 64, 65, 257])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("kind", ["position", "head"])
def test_forms_agree(time, with_state, kind):
    q, k, v = _inputs(2, 3, time, 5, 4)
    log_g = _log_gates(2, 3, time, kind)
    state = _state(2, 3, 5, 4) if with_state else None
    ref, (s_ref, z_ref) = la.naive_causal_linear_attention(q, k, v, initial_state=state, log_g=log_g)
    for fn, kw in ((la.causal_linear_attention, {"chunk_size": 64}), (la.causal_linear_attention, {"chunk_size": 16}),
                   (la.recurrent_linear_attention, {})):
        out, (s, z) = fn(q, k, v, initial_state=state, log_g=log_g, **kw)
        for got, want in ((out, ref), (s, s_ref), (z, z_ref)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_naive_reference_is_the_recurrence_written_out():
    """The oracle itself against S_t = g_t S_{t-1} + k_t v_t^T, one position at a time, by hand."""
    q, k, v = _inputs(1, 2, 9, 3, 2)
    log_g = _log_gates(1, 2, 9, "position")
    s0, z0 = _state(1, 2, 3, 2)
    out, (s_ref, z_ref) = la.naive_causal_linear_attention(q, k, v, initial_state=(s0, z0), log_g=log_g)
    s, z = s0, z0
    for t in range(9):
        g = log_g[:, :, t].exp()
        s = g[..., None, None] * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        z = g[..., None] * z + k[:, :, t]
        expected = (q[:, :, t, :, None] * s).sum(-2) / ((q[:, :, t] * z).sum(-1, keepdim=True) + la.DEFAULT_EPS)
        torch.testing.assert_close(out[:, :, t], expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_ref, s, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z_ref, z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("time", [1, 65, 257])
def test_gradients_agree(time):
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, time, 4, 3))
    log_g = _log_gates(1, 2, time, "position").requires_grad_()
    s0, z0 = (t.requires_grad_() for t in _state(1, 2, 4, 3))
    grads = []
    for fn, kw in ((la.naive_causal_linear_attention, {}), (la.causal_linear_attention, {"chunk_size": 16}),
                   (la.causal_linear_attention, {}), (la.recurrent_linear_attention, {})):
        out, (s, z) = fn(q, k, v, initial_state=(s0, z0), log_g=log_g, **kw)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() + s.sum() + z.sum()
        grads.append(torch.autograd.grad(loss, (q, k, v, log_g, s0, z0)))
    assert grads[0][3].abs().sum() > 0  # the gates do get a gradient
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_all_zero_features():
    """Zero query features read nothing (0, not nan); zero key features only decay the state."""
    q, k, v = _inputs(1, 2, 70, 4, 3)
    log_g = _log_gates(1, 2, 70, "position")
    s0, z0 = _state(1, 2, 4, 3)
    for fn in (la.causal_linear_attention, la.recurrent_linear_attention, la.naive_causal_linear_attention):
        out, _ = fn(torch.zeros_like(q), k, v, initial_state=(s0, z0), log_g=log_g)
        assert (out == 0).all()
        _, (s, z) = fn(q, torch.zeros_like(k), v, initial_state=(s0, z0), log_g=log_g)
        kept = log_g.sum(-1).exp()
        torch.testing.assert_close(s, kept[..., None, None] * s0, rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(z, kept[..., None] * z0, rtol=1e-12, atol=1e-300)


def _pad(x, where, n):
    """n zero positions inserted at time index `where` (zero keys and log-gates: padding)."""
    shape = list(x.shape)
    shape[2] = n
    return torch.cat([x[:, :, :where], x.new_zeros(shape), x[:, :, where:]], dim=2)


@pytest.mark.parametrize("split", [0, 1, 30, 64, 100, 130])
@pytest.mark.parametrize("padding", [0, 5])
def test_pieces_equal_whole(split, padding):
    """chunked([a | b]) == chunked(a), then chunked(b) from its state; with `padding` positions
    (zero keys, gate 1) at a's end, as a stream's last block is padded, nothing changes."""
    q, k, v = _inputs(2, 2, 130, 4, 3)
    log_g = _log_gates(2, 2, 130, "position")
    whole, (s_whole, z_whole) = la.causal_linear_attention(q, k, v, log_g=log_g, chunk_size=16)
    first = [_pad(t[:, :, :split], split, padding) for t in (q, k, v, log_g[:, :, :, None])]
    out_a, state = la.causal_linear_attention(*first[:3], log_g=first[3][..., 0], chunk_size=16)
    out_b, (s, z) = la.causal_linear_attention(q[:, :, split:], k[:, :, split:], v[:, :, split:], initial_state=state,
                                               log_g=log_g[:, :, split:], chunk_size=16)
    torch.testing.assert_close(torch.cat([out_a[:, :, :split], out_b], dim=2), whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, s_whole, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z, z_whole, rtol=1e-10, atol=1e-10)


def test_left_padding_changes_no_output():
    q, k, v = _inputs(1, 2, 40, 4, 3)
    log_g = _log_gates(1, 2, 40, "position")
    out, state = la.causal_linear_attention(q, k, v, log_g=log_g, chunk_size=16)
    padded = [_pad(t, 0, 7) for t in (q, k, v, log_g[..., None])]
    padded[0][:, :, :7] = 1.0  # a padded query reads whatever; a padded key must add nothing
    out_p, state_p = la.causal_linear_attention(*padded[:3], log_g=padded[3][..., 0], chunk_size=16)
    torch.testing.assert_close(out_p[:, :, 7:], out, rtol=1e-10, atol=1e-10)
    for a, b in zip(state_p, state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sixteen_thousand_tokens_of_strong_decay_stay_exact(dtype):
    """Chunk sums of log-gates reach -8 x 64 and the whole sequence's -40000: a cumprod of gates
    would underflow (and dividing by it overflow). Heads: strong varied gates per position, a
    constant g = e^-2, and a weak one; the output and state equal float64's on the same inputs."""
    g = torch.Generator().manual_seed(0)
    t = 16384
    q, k = (torch.rand(1, 3, t, 8, generator=g).to(dtype) for _ in range(2))
    v = (torch.rand(1, 3, t, 4, generator=g) * 2 - 1).to(dtype)
    log_g = torch.stack([-5 * torch.rand(t, generator=g), torch.full((t,), -2.0), torch.full((t,), -1e-4)])[None]
    out, (s, z) = la.causal_linear_attention(q, k, v, log_g=log_g)
    assert out.dtype == dtype and s.dtype == torch.float32
    ref, (s_ref, z_ref) = la.causal_linear_attention(q.double(), k.double(), v.double(), log_g=log_g.double())
    assert torch.isfinite(out.float()).all() and torch.isfinite(s).all() and torch.isfinite(z).all()
    tol = 1e-4 if dtype == torch.float32 else 1e-2  # bfloat16: the output's rounding
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s.double(), s_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(z.double(), z_ref, rtol=1e-4, atol=1e-4)
    # The decode step from the state before the last position agrees with the parallel pass.
    _, before = la.causal_linear_attention(q[:, :, :-1], k[:, :, :-1], v[:, :, :-1], log_g=log_g[:, :, :-1])
    step, _ = la.linear_attention_step(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], before, log_g=log_g[:, :, -1:])
    torch.testing.assert_close(step.double(), ref[:, :, -1:], rtol=tol, atol=tol)


@pytest.mark.parametrize("inplace", [False, True])
def test_packed_step_scales_the_state_first(inplace):
    q, k, v = _inputs(2, 3, 1, 5, 4)
    log_g = _log_gates(2, 3, 1, "position")
    state = _state(2, 3, 5, 4)
    out_n, final_n = la.naive_causal_linear_attention(q, k, v, initial_state=state, log_g=log_g)
    packed = la.pack_state(state)
    out, new = la.packed_linear_attention_step(q, k, la.with_ones_column(v), packed, log_g=log_g, inplace=inplace)
    assert (new is packed) == inplace
    torch.testing.assert_close(out, out_n, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new, la.pack_state(final_n), rtol=1e-12, atol=1e-12)


# -- the attention module ----------------------------------------------------------------------------
def _attention(decay, fold=True, seed=0):
    """A float64 T2RSelfAttention with random weights and decay strong enough to matter (g ~ 0.3-0.9)."""
    torch.manual_seed(seed)
    attn = T2RSelfAttention(16, 2, feature_dim=4, decay=decay, fold_feature_map=fold).double()
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if decay in ("learned", "gated"):
            bias = attn.decay.logit if decay == "learned" else attn.decay.bias
            bias.copy_(torch.tensor([-0.5, 2.0], dtype=torch.float64))
        if decay == "gated":
            attn.decay.weight.normal_(0, 0.3)
    return attn.eval()


def _x(time=70, batch=3, seed=1):
    return torch.randn(time, batch, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _heads(attn, t):
    return t.view(t.size(0), t.size(1), attn.num_heads, -1).permute(1, 2, 0, 3)


def _expected_log_gates(attn, decay, x):
    """log g written out from the definitions in decay.py: (batch or 1, heads, time or 1)."""
    heads = torch.arange(attn.num_heads, dtype=torch.float64)
    if decay == "fixed":
        return torch.log(1 - 2.0 ** -(5 + heads))[None, :, None]
    if decay == "learned":
        return torch.log(torch.sigmoid(attn.decay.logit))[None, :, None]
    return torch.log(torch.sigmoid(x @ attn.decay.weight.T + attn.decay.bias)).permute(1, 2, 0)


@pytest.mark.parametrize("decay", DECAYING)
@pytest.mark.parametrize("fold", [True, False])
def test_module_is_the_textbook_form(decay, fold):
    attn = _attention(decay, fold)
    x = _x(time=30)
    with torch.no_grad():
        q = attn.feature_map(_heads(attn, attn.q_proj(x)))
        k = attn.feature_map(_heads(attn, attn.k_proj(x)))
        ref, _ = la.naive_causal_linear_attention(q, k, _heads(attn, attn.v_proj(x)),
                                                  log_g=_expected_log_gates(attn, decay, x))
        expected = attn.out_proj(ref.permute(2, 0, 1, 3).reshape(30, 3, 16))
        torch.testing.assert_close(attn(x, x, x)[0], expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", DECAYING)
def test_folded_and_plain_agree_in_values_and_gradients(decay):
    folded, plain = _attention(decay, fold=True), _attention(decay, fold=False)
    x = _x()
    for a, b in zip(outputs_and_gradients(folded, x), outputs_and_gradients(plain, x)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    decay_grads = [p.grad for name, p in folded.named_parameters() if name.startswith("decay.")]
    assert len(decay_grads) == {"fixed": 0, "learned": 1, "gated": 2}[decay]
    assert all(g is not None and g.abs().sum() > 0 for g in decay_grads)  # the gates learn


@pytest.mark.parametrize("decay", DECAYING)
@pytest.mark.parametrize("fold", [True, False])
def test_module_decoding_and_blocks_equal_full_forward(decay, fold):
    attn = _attention(decay, fold)
    x = _x(time=150)
    full = attn(x, x, x)[0].detach()
    with torch.no_grad():
        for prefix in (0, 1, 70):
            torch.testing.assert_close(_decode(attn, x, prefix), full, rtol=1e-10, atol=1e-10)
        state = {}  # a long input read block by block (stream scoring, chunked prefill)
        blocks = torch.cat([attn(x[s:s + 40], x[s:s + 40], x[s:s + 40], incremental_state=state)[0]
                            for s in range(0, 150, 40)])
        torch.testing.assert_close(blocks, full, rtol=1e-10, atol=1e-10)
    # Under autograd the step does not update in place; values are the same.
    torch.testing.assert_close(_decode(attn, x[:20], 5), full[:20], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", DECAYING)
def test_module_reorder_equals_the_permuted_batch(decay):
    order = torch.tensor([2, 0, 3, 3])  # beam search also duplicates rows
    continued, reference = decode_reordered(_attention(decay), _x(time=10, batch=4), order, 5)
    torch.testing.assert_close(continued, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("decay", DECAYING)
def test_padding_never_enters_the_state(decay):
    """Left padding changes no real output; padding at a block's end (a stream's last block) and a
    padded decode step leave the state exactly as the real tokens left it."""
    attn = _attention(decay)
    x, junk = _x(time=20, batch=2), _x(time=6, batch=2, seed=9)
    pad_first = torch.zeros(2, 26, dtype=torch.bool)
    pad_first[1, :6] = True  # row 1 left-padded
    pad_last = torch.zeros(2, 26, dtype=torch.bool)
    pad_last[1, 20:] = True  # row 1 padded at its end
    with torch.no_grad():
        out = attn(x, x, x)[0]
        left = torch.cat([junk, x])
        out_left = attn(left, left, left, key_padding_mask=pad_first)[0]
        torch.testing.assert_close(out_left[6:, 1], out[:, 1], rtol=1e-10, atol=1e-10)

        clean, padded = {}, {}
        attn(x, x, x, incremental_state=clean)
        right = torch.cat([x, junk])
        attn(right, right, right, key_padding_mask=pad_last, incremental_state=padded)
        torch.testing.assert_close(attn._saved_state(padded)[1], attn._saved_state(clean)[1], rtol=1e-10, atol=1e-10)
        before = attn._saved_state(clean).clone()
        attn(junk[:1], None, None, key_padding_mask=torch.tensor([[False], [True]]), incremental_state=clean)
        torch.testing.assert_close(attn._saved_state(clean)[1], before[1], rtol=0, atol=0)


def test_no_decay_has_no_tensors_and_calls_the_plain_math():
    """--t2r-decay none is the model of before: the same tensors, and log_g=None all the way down."""
    attn = T2RSelfAttention(16, 2, feature_dim=4).double()
    assert attn.decay is None and not any(name.startswith("decay") for name in attn.state_dict())
    x = _x(time=70)
    with torch.no_grad():
        q, k, v1, log_g = attn._project(x, None, None)[:4]
        assert log_g is None
        out, _ = la.packed_causal_linear_attention(q, k, v1, chunk_size=attn.chunk_size)
        assert torch.equal(attn(x, x, x)[0], attn._merge(out))


@pytest.mark.parametrize("decay", ["learned", "gated"])
def test_trainable_gates_start_close_to_one(decay):
    """A converted model starts near plain T2R: every gate >= 1 - 2^-8, the same at every position."""
    attn = T2RSelfAttention(16, 4, feature_dim=4, decay=decay).double()
    x = _x(time=5, batch=2)
    log_g = attn._project(x, None, None)[3].expand(2, 4, 5)
    assert (log_g.exp() >= 1 - 2 ** -8 - 1e-12).all() and (log_g < 0).all()
    assert torch.equal(log_g, log_g[:1, :, :1].expand_as(log_g))


@pytest.mark.parametrize("decay", ["learned", "gated"])
def test_decay_memory_sets_where_the_gates_start(decay):
    """--t2r-decay-memory M: head h starts at g = 1 - 1/(M 2^h), from the command line down."""
    model, _ = build_model("t2r_lm", TINY_LM + ["--t2r-decay", decay, "--t2r-decay-memory", "2048"])
    attn = model.decoder.layers[0].self_attn
    x = torch.randn(3, 1, attn.embed_dim)
    log_g = attn._project(x, None, None)[3].expand(1, attn.num_heads, 3)[0, :, 0].double()
    expected = torch.log1p(-1 / (2048 * 2.0 ** torch.arange(attn.num_heads, dtype=torch.float64)))
    torch.testing.assert_close(log_g, expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("decay", ["none", "fixed"])
def test_decay_memory_without_a_trainable_decay_is_one_clear_error(decay):
    from t2r_fairseq.options import T2ROptionError

    with pytest.raises(T2ROptionError, match=f"--t2r-decay-memory 2048 sets where a learned or gated decay starts, "
                                             f"and --t2r-decay {decay} has none"):
        build_model("t2r_lm", TINY_LM + ["--t2r-decay", decay, "--t2r-decay-memory", "2048"])


def test_fixed_gates_survive_half_precision():
    """The fixed buffer holds exponents (exact in any dtype): a half-precision model uses the same gates."""
    attn = T2RSelfAttention(16, 4, feature_dim=4, decay="fixed")
    expected = attn.decay.log_gates()
    assert torch.equal(attn.to(torch.bfloat16).decay.log_gates(), expected)
    assert expected.dtype == torch.float32
    torch.testing.assert_close(expected.exp().flatten(), 1 - 2.0 ** -torch.arange(5.0, 9.0), rtol=0, atol=1e-7)


# -- whole decoders ----------------------------------------------------------------------------------
def _model(decay, extra=()):
    model, _ = build_model("t2r_lm", TINY_LM + ["--t2r-decay", decay, *extra])
    with torch.no_grad():  # decay strong enough that a wrong gate shows in 70 tokens
        for name, p in model.named_parameters():
            if name.endswith(("decay.logit", "decay.bias")):
                p.fill_(1.0)
            elif name.endswith("decay.weight"):
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("decay", DECAYS)
def test_decoder_decodes_token_by_token_as_its_full_forward(decay):
    model = _model(decay)
    assert all(layer.self_attn.decay is None for layer in model.decoder.layers) == (decay == "none")
    tokens = _tokens(3, 70, 60)  # crosses a chunk boundary (64)
    with torch.no_grad():
        full = _log_probs(model, tokens)
        steps, _ = _incremental(model, tokens)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


def test_hybrid_decoder_with_decay_decodes_as_its_full_forward():
    model = _model("gated", ["--t2r-softmax-layers", "1"])
    assert model.decoder.layers[1].self_attn.__class__.__name__ == "MultiheadAttention"
    tokens = _tokens(2, 30, 60)
    with torch.no_grad():
        torch.testing.assert_close(_incremental(model, tokens)[0], _log_probs(model, tokens), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("decay", DECAYING)
def test_decoder_reorder_equals_decoding_the_permuted_batch(decay):
    continued, reference = decoder_reordered(_model(decay), _tokens(4, 12, 60, seed=1), torch.tensor([2, 0, 3, 3]), 6)
    torch.testing.assert_close(continued, reference, rtol=1e-4, atol=1e-4)


# -- options and conversion --------------------------------------------------------------------------
@pytest.mark.parametrize("decay", DECAYING)
def test_conversion_names_the_decay_tensors_as_new(decay):
    from t2r_fairseq.transfer import transfer_softmax_weights

    softmax, _ = build_model("transformer_lm", TINY_LM_SOFTMAX)
    student = _model(decay)
    new = transfer_softmax_weights(student, softmax.state_dict())
    decay_keys = {k for k in student.state_dict() if ".decay." in k}
    assert decay_keys and decay_keys <= set(new)
    assert set(new) - decay_keys == {k for k in student.state_dict() if ".feature_map." in k}


def test_decay_on_cross_attention_only_settings_is_one_clear_error():
    from t2r_fairseq.options import T2ROptionError

    with pytest.raises(T2ROptionError, match="--t2r-decay fixed decays the state of T2R self-attention.*"
                                             "drop --t2r-decay or a layer from --t2r-softmax-layers"):
        build_model("t2r_lm", TINY_LM + ["--t2r-decay", "fixed", "--t2r-softmax-layers", "0,1"])


def test_converter_with_decay_as_typed(tmp_path):
    """t2r-convert --t2r-decay gated: the log names the gate tensors as new; an unknown value and a
    setting without T2R self-attention are one line each, with nothing written."""
    softmax, cfg = build_model("transformer_lm", TINY_LM_SOFTMAX)
    teacher = save_checkpoint(tmp_path / "softmax.pt", softmax, cfg)
    out = tmp_path / "t2r.pt"
    proc = run(["t2r-convert", "--input", teacher, "--output", out, "--t2r-decay", "gated"])
    assert "decoder.layers.1.self_attn.decay.weight" in proc.stdout + proc.stderr
    state = torch.load(out, weights_only=False)
    assert state["cfg"]["model"]["t2r_decay"] == "gated"
    bad = run(["t2r-convert", "--input", teacher, "--output", tmp_path / "bad.pt", "--t2r-decay", "linear"],
              check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "invalid choice: 'linear'" in bad.stderr.strip().splitlines()[-1]
    none_left = run(["t2r-convert", "--input", teacher, "--output", tmp_path / "bad.pt", "--t2r-decay", "learned",
                     "--t2r-softmax-layers", "0,1"], check=False)
    assert none_left.returncode == 2 and "Traceback" not in none_left.stderr
    assert none_left.stderr.strip().splitlines()[-1].startswith("t2r-convert: error: --t2r-decay learned")
    assert not (tmp_path / "bad.pt").exists()


def test_finetune_and_score_with_decay_as_typed(lm_workdir):
    """fairseq-train --convert-from ... --t2r-decay learned logs the gates as new tensors and trains
    them; fairseq-eval-lm scores the checkpoint."""
    save_dir = lm_workdir / "t2r_decay"
    proc = run(["fairseq-train", lm_workdir / "bin", "--user-dir", USER_DIR, "--task", "t2r_language_modeling",
                "--convert-from", lm_workdir / "softmax/checkpoint_last.pt", "--arch", "t2r_lm_wiki103", *MODEL,
                *TRAIN, "--max-update", 3, "--save-dir", save_dir, "--t2r-decay", "learned"])
    log = proc.stdout + proc.stderr
    assert "decoder.layers.1.self_attn.decay.logit" in log.split("converted")[1].splitlines()[0], log[-3000:]
    logit = torch.load(save_dir / "checkpoint_last.pt", weights_only=False)["model"]["decoder.layers.1.self_attn.decay.logit"]
    assert not torch.equal(logit.float(), T2RSelfAttention(32, 4, decay="learned").decay.logit)  # it trained
    scored = run(["fairseq-eval-lm", lm_workdir / "bin", "--user-dir", USER_DIR, "--path", save_dir / "checkpoint_last.pt",
                  "--tokens-per-sample", 64, "--cpu"])
    assert "Perplexity" in scored.stderr
