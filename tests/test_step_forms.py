"""Step forms (docs/masked_mixers.md#step-forms-and-generation): for every mixing op and the transformer,
feeding tokens one at
a time through ``method='step'`` gives the parallel forward's logits at every position (fp32); the
structured recurrent mixers (docs/recurrent_mixers.md#structured-matrices) match their defining formulas,
carry O(d) state, and clip
their decay with gradient 1 on [0.9, 1]."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax.config import base_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, mixing, mixing_math

V, N, D, L, B = 64, 16, 32, 2, 3

VARIANTS = {
    "flat": dict(),
    "flat_headed": dict(heads=4),
    "flat_expanded": dict(expanded=True),
    "flat_straight_through": dict(mask_grad="straight_through"),
    "flat_no_ln_not_reference_tied": dict(layer_norm=False, reference=False, tie_embeddings=True),
    "toeplitz": dict(mixing="toeplitz"),
    "toeplitz_fft": dict(mixing="toeplitz", mixing_impl="fft"),
    "toeplitz_headed": dict(mixing="toeplitz", heads=2),
    "toeplitz_srm_block": dict(mixing="toeplitz", block="srm"),
    "row": dict(mixing="row", block="srm"),
    "col": dict(mixing="col", block="srm"),
    "col_mixer_block": dict(mixing="col"),
    "mixed": dict(mixing="mixed", heads=4, block="srm"),
    "mixed_no_decay": dict(mixing="mixed", heads=2, block="srm", decay=False),
    "mixed_expanded": dict(mixing="mixed", heads=2, block="srm", expanded=True),
    "transformer": dict(kind="transformer", n_heads=4),
    "gpt": dict(kind="transformer", transformer="gpt", n_heads=4),
    # ablations (docs/ablations.md): a second attention has its own KV cache
    "transformer_mlp_attention_no_norms": dict(kind="transformer", n_heads=4, mlp="attention",
                                               layer_norm=False),
    "transformer_no_mlp_no_residual": dict(kind="transformer", n_heads=4, mlp="none", residual=False),
    "flat_no_mlp": dict(mlp="none"),
    # transformer-mixer hybrids (docs/transformer_baseline.md#hybrids): the mixing caches its inputs
    "transfixer": dict(kind="transformer", n_heads=4, hybrid="series"),
    "parallel_hybrid_headed": dict(kind="transformer", n_heads=4, hybrid="parallel", heads=2),
    "transfixer_gpt_mlp_attention": dict(kind="transformer", transformer="gpt", n_heads=4,
                                         hybrid="series", mlp="attention"),
    # kernel mixing (docs/masked_mixers.md#kernel-mixing, k > 1): cached mixing inputs, per-tap masked row
    "flat_kernel4": dict(kernel=4),
    "flat_kernel3_headed": dict(kernel=3, heads=2),
    "flat_kernel2_expanded_straight_through": dict(kernel=2, expanded=True, mask_grad="straight_through"),
    # mixer block variants (docs/masked_mixers.md#other-block-variants): P caches per block; the
    # positional channel takes the step's absolute position
    "parallel_mixers3_softmax": dict(parallel_mixers=3, softmax_mixer=True),
    "position_channel_parallel_scanned": dict(position_channel=True, parallel_mixers=2,
                                              scan_layers=True),
}
SRM = {k for k, v in VARIANTS.items() if v.get("mixing") in mixing.SRM_MIXINGS}


def test_every_mixing_op_has_a_step_form_variant():
    """Adding an entry to mixing.MIXING_OPS needs a line in VARIANTS above."""
    covered = {v.get("mixing", "flat") for v in VARIANTS.values() if v.get("kind", "mixer") == "mixer"}
    assert set(mixing.MIXING_OPS) <= covered, set(mixing.MIXING_OPS) - covered


def tiny_cfg(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, n_ctx=N, d_model=D, n_layers=L))
    cfg.update(overrides)
    return cfg


def _params(model, seed=0):
    # unsafe_rbg: much smaller compiles per parameter shape than threefry; any random bits serve
    key = jax.random.key(seed, impl="unsafe_rbg")
    params = nn.meta.unbox(model.init(key, jnp.zeros((1, N), jnp.int32))["params"])

    # move λ inside (0.9, 1) so that the decay is exercised (it starts at exactly 1)
    def shift(path, x):
        if "lam" in jax.tree_util.keystr(path):
            return x - 0.04 - 0.01 * jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)
        return x

    return jax.tree_util.tree_map_with_path(shift, params)


def step_logits(model, params, tokens_BxN, mode):
    """Logits [B, N, V] from feeding tokens one at a time through the step form (lax.scan)."""

    @jax.jit
    def run(tokens):
        def body(cache, inp):
            tok, pos = inp
            logits, cache = model.apply({"params": params}, tok, pos, cache, method="step")
            return cache, logits

        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
        _, logits = jax.lax.scan(body, model.init_cache(tokens.shape[0], mode), (tokens.T, positions))
        return jnp.swapaxes(logits, 0, 1)

    return np.asarray(run(tokens_BxN))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_step_equals_parallel(name):
    """Every position, every step mode of the model ('cached'; also 'recurrent' for SRMs)."""
    model = build_model(tiny_cfg(**VARIANTS[name]))
    params = _params(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, V, (B, N)), jnp.int32)
    full = np.asarray(jax.jit(lambda t: model.apply({"params": params}, t))(tokens))
    scale = np.abs(full).max()
    top2 = np.sort(full, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-4 * scale
    for mode in ("cached", "recurrent") if name in SRM else ("cached",):
        stepped = step_logits(model, params, tokens, mode)
        np.testing.assert_allclose(stepped, full, rtol=0, atol=2e-6 * scale + 1e-6, err_msg=mode)
        # greedy next tokens agree wherever the top two logits are not within round-off
        np.testing.assert_array_equal(stepped.argmax(-1)[clear], full.argmax(-1)[clear])


def test_recurrent_mode_needs_structured_mixing():
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="recurrent"):
        model.init_cache(1, "recurrent")
    with pytest.raises(ValueError, match="KV cache"):
        build_model(tiny_cfg(kind="transformer")).init_cache(1, "recurrent")


def test_recurrent_state_does_not_grow_with_length():
    def cache_bytes(n, mode):
        model = build_model(tiny_cfg(mixing="mixed", heads=2, block="srm", n_ctx=n))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.init_cache(2, mode)))

    assert cache_bytes(16, "recurrent") == cache_bytes(4096, "recurrent") == 2 * L * D * 4
    assert cache_bytes(4096, "cached") == 256 * cache_bytes(16, "cached")


def _loop_srm(v, lam, c, x, col, n_ctx):
    """y_i = Σ_{j≤i} A_ij x_j + c_i with A from docs/recurrent_mixers.md#structured-matrices,
    by loops (float64)."""
    delta = min(max(lam, 0.9), 1.0) ** (512.0 / n_ctx)
    y = np.zeros_like(x)
    for i in range(x.shape[1]):
        for j in range(i + 1):
            a = (v[i] if col else v[j]) * delta ** (i - j)
            y[:, i] += a * x[:, j]
        y[:, i] += c[i]
    return y


@pytest.mark.parametrize("kind", ["col", "row"])
@pytest.mark.parametrize("lam", [1.0, 0.95, 0.8])
def test_srm_parallel_matches_loops(kind, lam):
    rng = np.random.default_rng(3)
    n, d = 12, 5
    v, c = rng.standard_normal(n), rng.standard_normal(n)
    x = rng.standard_normal((2, n, d))
    y = mixing.causal_mix(
        jnp.asarray(x, jnp.float32), mixing=kind, v=jnp.asarray(v, jnp.float32),
        c=jnp.asarray(c, jnp.float32), lam=jnp.asarray(lam, jnp.float32),
    )
    np.testing.assert_allclose(np.asarray(y), _loop_srm(v, lam, c, x, kind == "col", n), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3])  # the einsum form at B = 1, the broadcast sum from 2
@pytest.mark.parametrize("headed", [False, True])
def test_cached_mix_step_is_the_row_times_the_cache(batch, headed):
    rng = np.random.default_rng(batch)
    n, h, k = 6, 2, 3
    row = rng.standard_normal((h, n) if headed else (n,)).astype(np.float32)
    cache = rng.standard_normal((batch, n, h, k) if headed else (batch, n, h * k)).astype(np.float32)
    want = np.zeros((batch, h, k) if headed else (batch, h * k), np.float32)
    for j in range(n):  # Σ_j row_j cache_j, one head's row per head
        want += (row[:, j][None, :, None] if headed else row[j]) * cache[:, j]
    got = jax.jit(mixing_math.cached_mix_step)(jnp.asarray(row), jnp.asarray(cache))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_mixed_heads_are_half_column_half_row():
    is_col = np.asarray(mixing_math.srm_is_col("mixed", 4))
    np.testing.assert_array_equal(is_col, [True, True, False, False])
    v = jnp.arange(1.0, 5.0)[None].repeat(4, 0) * jnp.arange(1.0, 5.0)[:, None]  # [H=4, n=4]
    a = np.asarray(mixing_math.srm_matrix(v, jnp.ones(4), mixing_math.srm_is_col("mixed", 4)))
    np.testing.assert_allclose(a[0], np.tril(np.asarray(v[0])[:, None] * np.ones((4, 4))))  # v_i
    np.testing.assert_allclose(a[3], np.tril(np.ones((4, 4)) * np.asarray(v[3])[None, :]))  # v_j


def test_clipped_decay_value_and_gradient():
    lam = jnp.asarray([0.85, 0.9, 0.95, 1.0, 1.05], jnp.float32)
    np.testing.assert_allclose(np.asarray(mixing_math.clip_decay(lam)), [0.9, 0.9, 0.95, 1.0, 1.0])
    grad = jax.vmap(jax.grad(mixing_math.clip_decay))(lam)
    np.testing.assert_array_equal(np.asarray(grad), [0.0, 1.0, 1.0, 1.0, 0.0])
    # κ = n/512: δ = clip(λ)^(512/n)
    np.testing.assert_allclose(float(mixing_math.srm_delta(jnp.float32(0.95), 1024)), 0.95**0.5, rtol=1e-6)
    assert float(mixing_math.srm_delta(jnp.float32(0.95), 1024, decay=False)) == 1.0


def test_srm_init_and_gradient_reaches_decay():
    model = build_model(tiny_cfg(mixing="mixed", heads=2, block="srm", n_ctx=128, d_model=16,
                                 n_layers=1))
    tokens = jnp.zeros((1, 128), jnp.int32)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), tokens)["params"])
    mix = params["block_0"]["mix"]
    np.testing.assert_array_equal(np.asarray(mix["lam"]), [1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(mix["c"]), 0.0)
    assert abs(float(jnp.std(mix["v"])) - np.sqrt(2 / 128)) < 0.03  # Kaiming, fan_in = n
    assert abs(float(jnp.std(params["block_0"]["ffn"]["fc1"]["kernel"])) - np.sqrt(2 / 16)) < 0.05
    np.testing.assert_array_equal(np.asarray(params["block_0"]["ffn"]["fc1"]["bias"]), 0.0)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, tokens) ** 2)

    g = jax.jit(jax.grad(loss))(params)["block_0"]["mix"]["lam"]
    assert np.all(np.abs(np.asarray(g)) > 0), "λ = 1 sits on the clip bound and must still learn"


@pytest.mark.parametrize(
    "overrides",
    [dict(mixing="mixed", heads=0), dict(mixing="row", mixing_impl="fft"), dict(block="nope")],
)
def test_bad_srm_configs(overrides):
    with pytest.raises(UserError):
        build_model(tiny_cfg(**overrides))


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
def test_unmasked_models_have_no_step_form(kind):
    model = build_model(tiny_cfg(kind=kind, causal=False))
    with pytest.raises(UserError, match="causal=False"):
        model.init_cache(1)


def test_kernel_step_equals_plain_loop_generation_reference():
    """The kernel mixer's step logits equal a loop that reruns the parallel model on each prefix
    (right-padded; causal, so the padding never reaches earlier positions)."""
    model = build_model(tiny_cfg(kernel=4, n_layers=1))
    params = _params(model)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, V, (1, N)), jnp.int32)
    stepped = step_logits(model, params, tokens, "cached")
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    for p in range(N):
        prefix = jnp.zeros((1, N), jnp.int32).at[:, : p + 1].set(tokens[:, : p + 1])
        np.testing.assert_allclose(stepped[:, p], np.asarray(apply(prefix))[:, p], rtol=1e-5, atol=1e-5)


SLIDING = [k for k, v in VARIANTS.items() if build_model(tiny_cfg(**v)).slides]


def test_which_models_slide():
    """Toeplitz and structured recurrent mixers (kernel 1) and RoPE transformers; not flat, GPT or
    hybrids (their mixing has positions < n_ctx only)."""
    assert set(SLIDING) == {k for k, v in VARIANTS.items()
                            if v.get("mixing") in ("toeplitz", "row", "col", "mixed")
                            or (v.get("kind") == "transformer" and "transformer" not in v
                                and "hybrid" not in v)}
    flat = build_model(tiny_cfg())
    with pytest.raises(UserError, match="no sliding step"):
        flat.apply({"params": _params(flat)}, jnp.zeros((1,), jnp.int32), N, flat.init_cache(1),
                   method="slide_step")


@pytest.mark.parametrize("name", [k for k in SLIDING if not VARIANTS[k].get("expanded")])
def test_slide_step_is_the_last_n_ctx_tokens(name):
    """One layer (its mixing / attention inputs depend on their own token only): past n_ctx, the
    sliding step's logits at p equal the parallel forward's last position on tokens p−n+1..p.
    (Expanded mixing's second matrix reads the first one's outputs, which depend on the context.)"""
    model = build_model(tiny_cfg(**VARIANTS[name], n_layers=1))
    params = _params(model)
    total = N + 7
    tokens = np.random.default_rng(2).integers(0, V, (B, total)).astype(np.int32)
    step = jax.jit(lambda c, t, p: model.apply({"params": params}, t, p, c, method="step"))
    slide = jax.jit(lambda c, t, p: model.apply({"params": params}, t, p, c, method="slide_step"))
    full = jax.jit(lambda t: model.apply({"params": params}, t))
    cache = model.init_cache(B, "cached")
    for p in range(total):
        logits, cache = (step if p < N else slide)(cache, jnp.asarray(tokens[:, p]), jnp.int32(p))
        if p >= N - 1:
            want = np.asarray(full(jnp.asarray(tokens[:, p - N + 1: p + 1])))[:, -1]
            scale = np.abs(want).max()
            np.testing.assert_allclose(np.asarray(logits), want, rtol=0, atol=1e-5 * scale + 1e-6,
                                       err_msg=f"position {p}")
