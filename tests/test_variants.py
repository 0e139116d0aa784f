"""Model variants (docs/transformer_baseline.md#hybrids): the transfixer (a masked token mixing in
series with attention in every block) and the parallel hybrid (beside attention). Their step forms
and causality are in tests/test_step_forms.py and tests/test_models.py, their FLOPs in
tests/test_flops.py; here: parameter trees, the default staying the plain transformer, the
definition of each block, shorter inputs, bad values, presets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax import flops, objectives
from mixers_jax.config import base_config, load_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, layers
from mixers_jax.models.mixing import TokenMixing
from mixers_jax.models.transformer import Attention
from tests_util import config_path

V, N, D, L, B = 64, 16, 32, 2, 2


def tiny_cfg(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, n_ctx=N, d_model=D, n_layers=L, kind="transformer", n_heads=4))
    cfg.update(overrides)
    return cfg


def _init(model, seed=0):
    key = jax.random.key(seed, impl="unsafe_rbg")
    return nn.meta.unbox(model.init(key, jnp.zeros((1, N), jnp.int32))["params"])


def _tokens(seed=1, n=N):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, n)), jnp.int32)


def _shapes(tree):
    return jax.tree.map(lambda x: x.shape, tree)


@pytest.mark.parametrize("hybrid,extra", [("series", {"mix", "mix_norm"}), ("parallel", {"mix"})])
def test_hybrid_adds_only_the_mixing_to_every_block(hybrid, extra):
    plain = _shapes(_init(build_model(tiny_cfg())))
    hyb = _shapes(_init(build_model(tiny_cfg(hybrid=hybrid))))
    for i in range(L):
        assert set(hyb[f"block_{i}"]) - set(plain[f"block_{i}"]) == extra
        assert hyb[f"block_{i}"]["mix"] == {"w": (N, N), "c": (N,)}  # one flat matrix by default
        for name, sub in plain[f"block_{i}"].items():
            assert hyb[f"block_{i}"][name] == sub
    assert {k: v for k, v in hyb.items() if not k.startswith("block_")} == \
        {k: v for k, v in plain.items() if not k.startswith("block_")}


def test_default_is_the_plain_transformer():
    """hybrid='none' (the default) builds the same parameters and logits as a config without the
    field, so existing runs and checkpoints are unchanged."""
    cfg = tiny_cfg()
    assert cfg.hybrid == "none"
    legacy = {k: v for k, v in cfg.to_dict().items() if k != "hybrid"}
    a, b = build_model(cfg), build_model(legacy)
    pa, pb = _init(a), _init(b)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), pa, pb))
    tokens = _tokens()
    np.testing.assert_array_equal(a.apply({"params": pa}, tokens), b.apply({"params": pb}, tokens))


def _block_reference(params, x, hybrid, n):
    """One hybrid block written out from its definition (Llama norms, no dropout)."""
    spec = build_model(tiny_cfg(hybrid=hybrid)).spec
    rms = lambda p, h: layers.rms_norm(jnp.float32).apply({"params": p}, h)  # noqa: E731
    attn = lambda h: Attention(spec).apply({"params": params["attn"]}, h)  # noqa: E731

    def mix(h):  # the mixing over the first n of n_ctx positions
        full = jnp.pad(h, ((0, 0), (0, N - n), (0, 0)))
        return TokenMixing(spec.token_mixing).apply({"params": params["mix"]}, full)[:, :n]

    swiglu = layers.SwiGLU(D, 4 * D, jnp.float32)
    if hybrid == "series":
        x = x + attn(rms(params["attn_norm"], x))
        x = x + mix(rms(params["mix_norm"], x))
    else:
        h = rms(params["attn_norm"], x)
        x = x + attn(h) + mix(h)
    return x + swiglu.apply({"params": params["mlp"]}, rms(params["mlp_norm"], x))


@pytest.mark.parametrize("hybrid", ["series", "parallel"])
@pytest.mark.parametrize("n", [N, 11])
def test_block_is_its_definition(hybrid, n):
    """series: x += Attn(N x); x += Mix(N' x); x += MLP(N'' x). parallel: x += Attn(N x) + Mix(N x);
    x += MLP(N'' x). Inputs shorter than n_ctx use the mixing's first n rows and columns."""
    model = build_model(tiny_cfg(hybrid=hybrid, n_layers=1))
    params = _init(model)
    tokens = _tokens(n=n)
    x = model.apply({"params": params}, tokens, method="embed_tokens")
    got = model.apply({"params": params}, x, 1, method="blocks_output")
    want = _block_reference(params["block_0"], x, hybrid, n)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the mixing matters: zeroing it changes the output
    zeroed = jax.tree.map(jnp.zeros_like, params["block_0"]["mix"])
    other = model.apply({"params": {**params, "block_0": {**params["block_0"], "mix": zeroed}}}, x, 1,
                        method="blocks_output")
    assert np.abs(np.asarray(other - got)).max() > 1e-4


def test_shorter_input_is_the_prefix_of_the_full_one():
    model = build_model(tiny_cfg(hybrid="series"))
    params = _init(model)
    tokens = _tokens()
    full = model.apply({"params": params}, tokens)
    short = model.apply({"params": params}, tokens[:, :9])
    np.testing.assert_allclose(short, full[:, :9], rtol=1e-5, atol=1e-5)


def test_scanned_hybrid_equals_unscanned():
    plain, scanned = build_model(tiny_cfg(hybrid="series")), build_model(
        tiny_cfg(hybrid="series", scan_layers=True))
    params = _init(plain)
    stacked = {k: v for k, v in params.items() if not k.startswith("block_")}
    stacked["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"block_{i}"] for i in range(L)])
    tokens = _tokens()
    np.testing.assert_allclose(scanned.apply({"params": stacked}, tokens),
                               plain.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides,match", [
    (dict(hybrid="serial"), "model.hybrid must be one of"),
    (dict(hybrid="series", causal=False), "needs a causal transformer"),
    (dict(hybrid="series", heads=3), "divisible by model.heads"),
    (dict(hybrid="parallel", mixing="nope"), "mixing"),
])
def test_bad_hybrid_configs(overrides, match):
    with pytest.raises(UserError, match=match):
        build_model(tiny_cfg(**overrides))


def test_hybrid_refuses_explicit_positions_and_has_no_sliding_step():
    model = build_model(tiny_cfg(hybrid="parallel"))
    params = _init(model)
    x = model.apply({"params": params}, _tokens(), method="embed_tokens")
    with pytest.raises(ValueError, match="no explicit positions"):
        model.apply({"params": params}, x, jnp.zeros((B, N), jnp.int32), method="hidden")
    assert not model.slides
    with pytest.raises(UserError, match="no sliding step"):
        model.apply({"params": params}, jnp.zeros((1,), jnp.int32), N, model.init_cache(1),
                    method="slide_step")


def test_hybrid_flops_are_the_transformer_plus_one_mixing_per_block():
    """A flat mixing of n x n per block: 2·n·d forward FLOPs per token (dense), on top of the
    transformer; checked against XLA's count in tests/test_flops.py."""
    cfg = tiny_cfg(mixing_impl="dense")
    base = flops.flops_per_token(cfg, training=False)
    for hybrid in ("series", "parallel"):
        got = flops.flops_per_token(tiny_cfg(mixing_impl="dense", hybrid=hybrid), training=False)
        assert got == base + L * 2 * N * D


@pytest.mark.parametrize("preset,hybrid", [("transfixer", "series"), ("parallel_hybrid", "parallel"),
                                           ("smoke_transfixer", "series")])
def test_presets_share_the_mixer_cpu_budget(preset, hybrid):
    cfg = load_config(config_path("variants", preset))
    assert cfg.model.kind == "transformer" and cfg.model.hybrid == hybrid
    assert cfg.model.hybrid_mix_init == "zero"  # docs/transformer_baseline.md#hybrid-initialisation
    if not preset.startswith("smoke"):
        mixer = load_config(config_path("mixer_clm", "cpu"))
        for key in ("n_ctx", "d_model", "n_layers", "vocab_size"):
            assert cfg.model[key] == mixer.model[key], key
        assert cfg.train.steps == mixer.train.steps and cfg.train.batch_size == mixer.train.batch_size
        assert cfg.data.to_dict() == mixer.data.to_dict()


# ---------------------------------------------------------------------------------------------
# Multi-token prediction (objective 'mtp', docs/objectives.md#mtp)
# ---------------------------------------------------------------------------------------------

LM_KINDS = {"mixer": dict(kind="mixer"), "transformer": dict(kind="transformer", n_heads=4)}


def _batch(tokens):
    return {"tokens": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32),
            "token_bytes": jnp.ones(tokens.shape, jnp.int32)}


@pytest.mark.parametrize("kind", list(LM_KINDS))
def test_mtp_passes_never_see_their_targets(kind):
    """Changing token p leaves both passes' outputs at positions < p bit-identical, so output i
    (pass 1: target t_{i+1}, pass 2: t_{i+2}) never reads either target."""
    model = build_model(tiny_cfg(**LM_KINDS[kind]))
    params = {"params": _init(model)}
    run = jax.jit(lambda t: objectives.mtp_logits(model.apply, params, t))
    tokens = _tokens()
    base1, base2 = run(tokens)
    for p in (1, 7, N - 1):
        pert1, pert2 = run(tokens.at[:, p].set((tokens[:, p] + 1) % V))
        np.testing.assert_array_equal(pert1[:, :p], base1[:, :p])
        np.testing.assert_array_equal(pert2[:, :p], base2[:, :p])
        assert np.abs(np.asarray(pert1[:, p] - base1[:, p])).max() > 0


@pytest.mark.parametrize("kind", list(LM_KINDS))
def test_mtp_loss_at_i_has_no_gradient_from_later_inputs(kind):
    """d(pass-2 loss at position i)/d(input embedding at j) is zero for j > i (targets t_{i+1},
    t_{i+2} included) and not zero for some j ≤ i; the same for pass 1."""
    model = build_model(tiny_cfg(**LM_KINDS[kind]))
    params = {"params": _init(model)}
    tokens = _tokens()
    i = 6

    def loss_at_i(delta_BxNxD, which):
        def apply_fn(p, t):  # the model with delta added to its input embeddings
            x = model.apply(p, t, method="embed_tokens") + delta_BxNxD
            return model.apply(p, x, method=lambda m, h: m.logits(m.hidden(h)))
        logits1, logits2 = objectives.mtp_logits(apply_fn, params, tokens)
        logits, shift = (logits1, 1) if which == 1 else (logits2, 2)
        return objectives.token_nll(logits[:, i], tokens[:, i + shift]).sum()

    for which in (1, 2):
        g = np.asarray(jax.grad(loss_at_i)(jnp.zeros((B, N, D)), which))
        assert np.all(g[:, i + 1:] == 0), which
        assert np.abs(g[:, : i + 1]).max() > 0, which


def test_mtp_loss_is_the_sum_of_both_shifts():
    cfg = base_config()
    cfg.model.update(tiny_cfg(kind="mixer").to_dict())
    mtp = objectives.build("mtp", objectives.context(cfg))
    model = build_model(cfg.model)
    params = {"params": _init(model)}
    tokens = _tokens()
    loss, sums = mtp(model.apply, params, _batch(tokens))
    logits1 = model.apply(params, tokens)
    logits2 = model.apply(params, jnp.argmax(logits1, -1).astype(jnp.int32))
    l1 = objectives.token_nll(logits1[:, :-1], tokens[:, 1:]).mean()
    l2 = objectives.token_nll(logits2[:, :-2], tokens[:, 2:]).mean()
    np.testing.assert_allclose(loss, l1 + l2, rtol=1e-5)
    assert float(sums["tokens"]) == B * (N - 1) and float(sums["mtp2_tokens"]) == B * (N - 2)
    clm_loss, _ = objectives.clm(model.apply, params, _batch(tokens))
    np.testing.assert_allclose(sums["nll"] / sums["tokens"], clm_loss, rtol=1e-6)


def test_mtp_is_for_causal_lms_only():
    cfg = base_config()
    cfg.model.kind = "memory"
    with pytest.raises(UserError, match="'mtp' is for causal LMs"):
        objectives.build("mtp", objectives.context(cfg))


# ---------------------------------------------------------------------------------------------
# Bidirectional mixer (model.bidirectional, docs/masked_mixers.md#bidirectional-mixer)
# ---------------------------------------------------------------------------------------------


def _bidi_cfg(**kw):
    return tiny_cfg(kind="mixer", bidirectional=True, **kw)


def test_bidirectional_target_never_leaks():
    """d(loss at position i)/d(input embedding at i+1) is exactly zero (t_{i+1} is the target);
    the gradient from i+2 (the reverse stream) and from ≤ i (forward) is not."""
    model = build_model(_bidi_cfg())
    params = {"params": _init(model)}
    tokens = _tokens()

    def loss_at(delta_BxNxD, i):
        x = model.apply(params, tokens, method="embed_tokens") + delta_BxNxD
        logits = model.apply(params, x, method=lambda m, h: m.logits(m.hidden(h)))
        return objectives.token_nll(logits[:, i], tokens[:, i + 1]).sum()

    for i in (0, 7, N - 2):
        g = np.abs(np.asarray(jax.grad(loss_at)(jnp.zeros((B, N, D)), i))).max(axis=(0, 2))
        assert g[i + 1] == 0, i
        assert g[: i + 1].min() > 0, i  # forward stream: every position ≤ i
        if i + 2 < N:
            assert g[i + 2:].max() > 0, i  # reverse stream


def test_reverse_mix_is_masked_to_j_at_least_i_plus_2():
    from mixers_jax.models.bidirectional import reverse_mix
    spec = build_model(_bidi_cfg()).spec.token_mixing
    mix = TokenMixing(spec)
    z = jax.random.normal(jax.random.key(3), (B, N, D))
    p = nn.meta.unbox(mix.init(jax.random.key(4), z))
    got = reverse_mix(lambda u: mix.apply(p, u), z)
    w, c = np.asarray(p["params"]["w"]), np.asarray(p["params"]["c"])
    want = np.zeros((B, N, D), np.float32)
    for i in range(N):
        want[:, i] = c[N - 1 - i]
        for j in range(i + 2, N):
            want[:, i] += w[N - 1 - i, N + 1 - j] * np.asarray(z[:, j])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bidirectional_parameters_and_default():
    tree = _shapes(_init(build_model(_bidi_cfg())))
    assert set(tree["block_0"]) == {"ln_mix", "mix", "ln_rev", "rev", "ln_ffn", "ffn"}
    assert tree["block_0"]["rev"] == {"w": (N, N), "c": (N,)}
    plain = build_model(tiny_cfg(kind="mixer"))
    assert type(plain).__name__ == "MaskedMixerLM"  # bidirectional=False: the plain mixer
    assert set(_shapes(_init(plain))["block_0"]) == {"ln_mix", "mix", "ln_ffn", "ffn"}


def test_bidirectional_flops_are_two_streams():
    one = flops.flops_per_token(tiny_cfg(kind="mixer", mixing_impl="dense"), training=False)
    two = flops.flops_per_token(_bidi_cfg(mixing_impl="dense"), training=False)
    head = 2 * D * V
    assert two - head == 2 * (one - head)


@pytest.mark.parametrize("overrides,match", [(dict(heads=2), "model.heads"),
                                             (dict(mixing="toeplitz"), "model.mixing"),
                                             (dict(tie_embeddings=True), "model.tie_embeddings")])
def test_bidirectional_needs_the_plain_flat_mixer(overrides, match):
    with pytest.raises(UserError, match=match):
        build_model(_bidi_cfg(**overrides))


def test_bidirectional_has_no_step_form():
    with pytest.raises(UserError, match="no step form"):
        build_model(_bidi_cfg()).init_cache(1)


def test_linear_preset_is_affine_in_the_embedding():
    """configs/variants.py:linear: one flat-mixing block, no norm, no MLP: hidden(x) = x + W x + c,
    so hidden(a) + hidden(b) − hidden(0) = hidden(a + b) (no nonlinearity anywhere)."""
    cfg = load_config(config_path("variants", "smoke_linear"))
    cfg.model.update(dict(vocab_size=V, n_ctx=N, d_model=D))
    model = build_model(cfg.model)
    params = {"params": _init(model)}
    hidden = jax.jit(lambda x: model.apply(params, x, method="hidden"))
    a, b = (jax.random.normal(jax.random.key(k), (B, N, D)) for k in (5, 6))
    np.testing.assert_allclose(hidden(a) + hidden(b) - hidden(jnp.zeros_like(a)), hidden(a + b),
                               rtol=1e-4, atol=1e-4)
    assert set(params["params"]) == {"embed", "block_0", "head"}
    assert set(params["params"]["block_0"]) == {"mix"}
