"""Token-mixing ops against plain loop references (docs/masked_mixers.md)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax.models import mixing, mixing_math


def _rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _loop_causal_mix(w_NxN, x_BxNxD, c_N):
    """y_i = Σ_{j≤i} W_ij x_j + c_i, in float64 loops."""
    w, x, c = (np.asarray(a, np.float64) for a in (w_NxN, x_BxNxD, c_N))
    b, n, d = x.shape
    y = np.zeros((b, n, d))
    for i in range(n):
        for j in range(i + 1):
            y[:, i, :] += w[i, j] * x[:, j, :]
        y[:, i, :] += c[i]
    return y


def test_causal_mask():
    m = np.asarray(mixing_math.causal_mask(4))
    assert m.dtype == bool
    np.testing.assert_array_equal(m, np.tril(np.ones((4, 4), bool)))


def test_toeplitz_matrix_matches_loops():
    n = 9
    v = _rand(0, n)
    t = np.asarray(mixing_math.toeplitz_matrix(jnp.asarray(v)))
    ref = np.zeros((n, n), np.float32)
    for i in range(n):
        for j in range(i + 1):
            ref[i, j] = v[i - j]
    np.testing.assert_array_equal(t, ref)
    # headed: one matrix per row of v
    v_h = _rand(1, 3, n)
    t_h = np.asarray(mixing_math.toeplitz_matrix(jnp.asarray(v_h)))
    for h in range(3):
        np.testing.assert_array_equal(t_h[h], np.asarray(mixing_math.toeplitz_matrix(jnp.asarray(v_h[h]))))


def test_dense_causal_mix_matches_loop():
    n, d = 12, 5
    w, x, c = _rand(0, n, n), _rand(1, 2, n, d), _rand(2, n)
    y = mixing_math.add_position_bias(mixing_math.dense_causal_mix(jnp.asarray(w), jnp.asarray(x)), jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(y), _loop_causal_mix(w, x, c), rtol=1e-5, atol=1e-5)
    # causal_mix dispatcher, flat
    y2 = mixing.causal_mix(jnp.asarray(x), mixing="flat", w=jnp.asarray(w), c=jnp.asarray(c))
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))


@pytest.mark.parametrize("n", [1, 7, 64, 512])
def test_toeplitz_fft_equals_dense(n):
    v, x = _rand(n, n), _rand(n + 1, 2, n, 6)
    dense = np.asarray(mixing_math.toeplitz_mix_dense(jnp.asarray(v), jnp.asarray(x)))
    fft = np.asarray(mixing_math.toeplitz_mix_fft(jnp.asarray(v), jnp.asarray(x)))
    scale = np.abs(dense).max()
    np.testing.assert_allclose(fft, dense, rtol=0, atol=2e-6 * scale)
    # the dense Toeplitz path against the loop definition
    t = np.asarray(mixing_math.toeplitz_matrix(jnp.asarray(v)))
    if n <= 64:
        np.testing.assert_allclose(dense, _loop_causal_mix(t, x, np.zeros(n)), rtol=1e-5, atol=1e-4)


def test_headed_toeplitz_fft_equals_dense():
    n, h, k = 128, 3, 4
    v, x = _rand(0, h, n), _rand(1, 2, n, h, k)
    dense = np.asarray(mixing_math.headed_toeplitz_mix_dense(jnp.asarray(v), jnp.asarray(x)))
    fft = np.asarray(mixing_math.headed_toeplitz_mix_fft(jnp.asarray(v), jnp.asarray(x)))
    np.testing.assert_allclose(fft, dense, rtol=0, atol=2e-6 * np.abs(dense).max())


def test_fft_bf16_input_returns_bf16():
    v, x = jnp.asarray(_rand(0, 16)), jnp.asarray(_rand(1, 1, 16, 4)).astype(jnp.bfloat16)
    assert mixing_math.toeplitz_mix_fft(v, x).dtype == jnp.bfloat16


def test_straight_through_same_forward_unmasked_gradient():
    n, d = 8, 3
    w, x = jnp.asarray(_rand(0, n, n)), jnp.asarray(_rand(1, 2, n, d))
    g_out = jnp.asarray(_rand(2, 2, n, d))

    def loss(w, mode):
        return jnp.sum(mixing_math.dense_causal_mix(w, x, mode) * g_out)

    y_m = mixing_math.dense_causal_mix(w, x, "masked")
    y_st = mixing_math.dense_causal_mix(w, x, "straight_through")
    np.testing.assert_array_equal(np.asarray(y_st), np.asarray(y_m))  # bit-identical forward
    g_m = np.asarray(jax.grad(loss)(w, "masked"))
    g_st = np.asarray(jax.grad(loss)(w, "straight_through"))
    upper = ~np.tril(np.ones((n, n), bool))
    assert np.all(g_m[upper] == 0)
    assert np.all(g_st[upper] != 0)
    np.testing.assert_allclose(g_st[~upper], g_m[~upper], rtol=1e-6)
    # docs/training.md#causal-mask-gradient: for k = 1 the upper entries get Σ_{b,f} dL/dy_{b,i,f} · x_{b,j,f}
    full = np.einsum("bif,bjf->ij", np.asarray(g_out), np.asarray(x))
    np.testing.assert_allclose(g_st, full, rtol=1e-5, atol=1e-5)


def _headed_loop_reference(p, x, heads, expanded=False):
    """Per-head loop: z_h = x P_h + p_h; u_h = causal mix; concat; out projection."""
    x = np.asarray(x, np.float64)
    b, n, d = x.shape
    pk, pb = np.asarray(p["proj"]["kernel"], np.float64), np.asarray(p["proj"]["bias"], np.float64)
    concat = []
    for h in range(heads):
        z = x @ pk[:, h, :] + pb[h]
        if expanded:
            u = _loop_causal_mix(np.asarray(p["w1"])[h], z, np.asarray(p["c1"])[h])
            u = np.asarray(nn.gelu(jnp.asarray(u, jnp.float32), approximate=False), np.float64)
            u = _loop_causal_mix(np.asarray(p["w2"])[h], u, np.asarray(p["c2"])[h])
        else:
            u = _loop_causal_mix(np.asarray(p["w"])[h], z, np.asarray(p["c"])[h])
        concat.append(u)
    cat = np.concatenate(concat, axis=-1)  # head-major features
    ok = np.asarray(p["out"]["kernel"], np.float64).reshape(d, d)
    return cat @ ok + np.asarray(p["out"]["bias"], np.float64)


@pytest.mark.parametrize("expanded", [False, True])
def test_headed_mixing_matches_per_head_loop(expanded):
    n, d, heads = 8, 12, 3
    mod = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=d, heads=heads, expanded=expanded))
    x = jnp.asarray(_rand(0, 2, n, d))
    params = nn.meta.unbox(mod.init(jax.random.key(1), x)["params"])
    assert params["w1" if expanded else "w"].shape == (heads, n, n)
    y = np.asarray(mod.apply({"params": params}, x))
    np.testing.assert_allclose(y, _headed_loop_reference(params, x, heads, expanded), rtol=1e-4, atol=1e-5)


def test_headed_toeplitz_module_fft_equals_dense():
    n, d, heads = 16, 8, 2
    x = jnp.asarray(_rand(0, 2, n, d))
    dense = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=d, mixing="toeplitz", heads=heads, impl="dense"))
    fft = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=d, mixing="toeplitz", heads=heads, impl="fft"))
    params = dense.init(jax.random.key(0), x)["params"]
    np.testing.assert_allclose(
        np.asarray(fft.apply({"params": params}, x)),
        np.asarray(dense.apply({"params": params}, x)),
        rtol=1e-5,
        atol=1e-5,
    )


def test_reference_mixing_inits():
    n = 64
    w_init, c_init = mixing.mixing_inits(mixing.MixingSpec(n_ctx=n, d_model=1, mixing="flat"))
    w = np.asarray(w_init(jax.random.key(0), (n, n)))
    assert np.abs(w).max() <= 1 / np.sqrt(n) and np.abs(w).max() > 0.9 / np.sqrt(n)
    v_init, c_init = mixing.mixing_inits(mixing.MixingSpec(n_ctx=n, d_model=1, mixing="toeplitz"))
    v = np.asarray(v_init(jax.random.key(0), (4096,)))
    assert 0.9 < v.std() < 1.1
    assert np.all(np.asarray(c_init(jax.random.key(0), (n,))) == 0)


# --- kernel (k > 1) and unmasked mixing (docs/masked_mixers.md) ---


def _loop_kernel_mix(w_NxNxK, x_BxNxD, c_N, causal=True):
    """y_{b,i,f} = c_i + Σ_{j(≤i)} Σ_τ W_{ijτ} x_{b,j,f+τ−P_L} (zero outside [0, d)), float64 loops."""
    w, x, c = (np.asarray(a, np.float64) for a in (w_NxNxK, x_BxNxD, c_N))
    b, n, d = x.shape
    k = w.shape[-1]
    p_left = (k - 1) // 2
    y = np.zeros((b, n, d))
    for i in range(n):
        for j in range(i + 1 if causal else n):
            for t in range(k):
                for f in range(d):
                    g = f + t - p_left
                    if 0 <= g < d:
                        y[:, i, f] += w[i, j, t] * x[:, j, g]
        y[:, i, :] += c[i]
    return y


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("causal", [True, False])
def test_kernel_mix_matches_loop(k, causal):
    n, d = 6, 5
    w, x, c = _rand(0, n, n, k), _rand(1, 2, n, d), _rand(2, n)
    y = mixing.causal_mix(jnp.asarray(x), mixing="flat", w=jnp.asarray(w), c=jnp.asarray(c), causal=causal)
    np.testing.assert_allclose(np.asarray(y), _loop_kernel_mix(w, x, c, causal), rtol=1e-5, atol=1e-5)


def test_kernel_padding_is_asymmetric_extra_pad_right():
    """k=4: output feature f reads features f−1 .. f+2 (P_L = 1, P_R = 2)."""
    taps = np.asarray(mixing_math.feature_taps(jnp.arange(1.0, 6.0), 4))  # x = [1..5]
    np.testing.assert_array_equal(taps[:, 0], [0, 1, 2, 3])  # f = 0 reads x_{-1}=0, x_0, x_1, x_2
    np.testing.assert_array_equal(taps[:, 4], [4, 5, 0, 0])  # f = 4 reads x_3, x_4, 0, 0


def test_kernel_module_headed_and_one_tap_matches_flat():
    n, d, heads, k = 8, 12, 3, 3
    x = jnp.asarray(_rand(0, 2, n, d))
    mod = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=d, heads=heads, kernel=k))
    params = nn.meta.unbox(mod.init(jax.random.key(1), x)["params"])
    assert params["w"].shape == (heads, n, n, k)
    y = np.asarray(mod.apply({"params": params}, x))
    xp = np.asarray(x, np.float64) @ np.asarray(params["proj"]["kernel"], np.float64).reshape(d, d)
    xp = xp + np.asarray(params["proj"]["bias"], np.float64).reshape(d)
    hd = d // heads
    cat = np.concatenate([
        _loop_kernel_mix(params["w"][h], xp[..., h * hd:(h + 1) * hd], params["c"][h]) for h in range(heads)
    ], axis=-1)
    ref = cat @ np.asarray(params["out"]["kernel"], np.float64).reshape(d, d) + np.asarray(params["out"]["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5)
    # kernel=1 is the plain flat op: same parameter tree ([n, n]) as the default module
    flat = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=d, kernel=1))
    default = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=d))
    p1 = nn.meta.unbox(flat.init(jax.random.key(2), x)["params"])
    p0 = nn.meta.unbox(default.init(jax.random.key(2), x)["params"])
    assert jax.tree.map(np.shape, p1) == jax.tree.map(np.shape, p0) == {"w": (n, n), "c": (n,)}
    np.testing.assert_array_equal(np.asarray(flat.apply({"params": p1}, x)),
                                  np.asarray(default.apply({"params": p0}, x)))
    # a one-tap kernel computes the flat mix
    w = jnp.asarray(_rand(3, n, n))
    np.testing.assert_allclose(np.asarray(mixing_math.kernel_mix(mixing_math.mask_weight(w)[..., None], x)),
                               np.asarray(mixing_math.dense_causal_mix(w, x)), rtol=1e-5, atol=1e-6)


def test_kernel_reference_init_uses_fan_in_n_times_k():
    n, k = 16, 4
    mod = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=4, kernel=k))
    p = mod.init(jax.random.key(0), jnp.zeros((1, n, 4)))["params"]
    w, c = np.asarray(nn.meta.unbox(p["w"])), np.asarray(nn.meta.unbox(p["c"]))
    bound = 1 / np.sqrt(n * k)
    assert w.shape == (n, n, k) and np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound
    assert np.abs(c).max() <= bound


def test_unmasked_flat_and_two_sided_toeplitz_match_loops():
    n, d = 7, 3
    w, x, c = _rand(0, n, n), _rand(1, 2, n, d), _rand(2, n)
    y = mixing.causal_mix(jnp.asarray(x), mixing="flat", w=jnp.asarray(w), c=jnp.asarray(c), causal=False)
    ref = np.einsum("ij,bjd->bid", w.astype(np.float64), x) + c[None, :, None]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    v = _rand(3, 2 * n - 1)
    t = np.asarray(mixing_math.toeplitz_matrix_two_sided(jnp.asarray(v)))
    for i in range(n):
        for j in range(n):
            assert t[i, j] == v[i - j + n - 1]  # v_{n-1}: current token; v_{n-1+m}: m back
    dense = mixing.causal_mix(jnp.asarray(x), mixing="toeplitz", v=jnp.asarray(v), c=jnp.asarray(c),
                              causal=False)
    np.testing.assert_allclose(np.asarray(dense), np.einsum("ij,bjd->bid", t, x) + c[None, :, None],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 64])
def test_two_sided_toeplitz_fft_equals_dense(n):
    v, x = _rand(n, 2 * n - 1), _rand(n + 1, 2, n, 3)
    dense = np.asarray(mixing_math.dense_mix(mixing_math.toeplitz_matrix_two_sided(jnp.asarray(v)), jnp.asarray(x)))
    fft = np.asarray(mixing_math.toeplitz_two_sided_fft(jnp.asarray(v), jnp.asarray(x)))
    np.testing.assert_allclose(fft, dense, rtol=0, atol=2e-6 * np.abs(dense).max())
    vh, xh = _rand(7, 2, 2 * n - 1), _rand(8, 2, n, 2, 3)  # headed
    dense_h = np.asarray(mixing_math.headed_dense_mix(mixing_math.toeplitz_matrix_two_sided(jnp.asarray(vh)),
                                                 jnp.asarray(xh)))
    fft_h = np.asarray(mixing_math.toeplitz_two_sided_fft(jnp.asarray(vh), jnp.asarray(xh)))
    np.testing.assert_allclose(fft_h, dense_h, rtol=0, atol=2e-6 * np.abs(dense_h).max())


def test_unmasked_module_params_and_no_step_form():
    n = 6
    x = jnp.asarray(_rand(0, 1, n, 4))
    mod = mixing.TokenMixing(mixing.MixingSpec(n_ctx=n, d_model=4, mixing="toeplitz", causal=False, heads=2))
    p = mod.init(jax.random.key(0), x)["params"]
    assert nn.meta.unbox(p["v"]).shape == (2, 2 * n - 1)
    with pytest.raises(ValueError, match="no step form"):
        mod.init_cache(1)
    with pytest.raises(ValueError, match="causal only"):
        mixing.causal_mix(x, mixing="row", v=jnp.ones(n), c=jnp.zeros(n), lam=jnp.float32(1), causal=False)
