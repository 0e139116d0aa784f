"""Model-level tests: causality, parameter counts, partitioning, dtypes, reference numerics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from scipy.special import erf

from mixers_jax.config import base_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, layers

V, N, D, L = 64, 16, 32, 2


def tiny_cfg(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, n_ctx=N, d_model=D, n_layers=L))
    cfg.update(overrides)
    return cfg


VARIANTS = {
    "flat": dict(),
    "flat_headed": dict(heads=4),
    "flat_expanded": dict(expanded=True),
    "toeplitz_dense": dict(mixing="toeplitz"),
    "toeplitz_fft": dict(mixing="toeplitz", mixing_impl="fft"),
    "toeplitz_headed": dict(mixing="toeplitz", heads=2),
    "no_layer_norm": dict(layer_norm=False),
    "no_residual": dict(residual=False),
    "straight_through": dict(mask_grad="straight_through"),
    "not_reference_tied": dict(reference=False, tie_embeddings=True),
    "srm_row": dict(mixing="row", block="srm"),
    "srm_mixed": dict(mixing="mixed", heads=2, block="srm"),
    "transformer": dict(kind="transformer", n_heads=4),
    "gpt": dict(kind="transformer", transformer="gpt", n_heads=4),
    "no_mlp": dict(mlp="none"),
    "transformer_mlp_attention_no_norms": dict(kind="transformer", n_heads=4, mlp="attention",
                                               layer_norm=False),
    "transformer_no_mlp_no_residual": dict(kind="transformer", n_heads=4, mlp="none", residual=False),
    "transfixer": dict(kind="transformer", n_heads=4, hybrid="series"),
    "parallel_hybrid_headed": dict(kind="transformer", n_heads=4, hybrid="parallel", heads=2),
    # mixer block variants (docs/masked_mixers.md#other-block-variants)
    "parallel_mixers": dict(parallel_mixers=2),
    "softmax_mixer": dict(softmax_mixer=True),
    "position_channel": dict(position_channel=True),
}


def _init(model, n=N, seed=0):
    """The model's own initialisation, run op by op (unsafe_rbg: each parameter shape costs a much
    smaller compile than with threefry; no test here depends on which random bits are drawn)."""
    tokens = jnp.zeros((2, n), jnp.int32)
    return nn.meta.unbox(model.init(jax.random.key(seed, impl="unsafe_rbg"), tokens)["params"])


def _tokens(seed, b=2, n=N):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, n)), jnp.int32)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_causality(name):
    """Perturbing token p leaves logits < p unchanged and changes every position ≥ p; the
    gradient of logits[:, p] w.r.t. the block inputs is zero at positions > p, non-zero at ≤ p.
    Exact (bit-identical / exactly zero) except FFT Toeplitz, which is causal up to round-off."""
    model = build_model(tiny_cfg(**VARIANTS[name]))
    params = _init(model)
    exact = "fft" not in name
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    tokens = _tokens(1)
    base = np.asarray(apply(tokens))
    for p in (0, 6, N - 1):
        pert = np.asarray(apply(tokens.at[:, p].set((tokens[:, p] + 1) % V)))
        if exact:
            np.testing.assert_array_equal(pert[:, :p], base[:, :p])
        else:
            np.testing.assert_allclose(pert[:, :p], base[:, :p], rtol=0, atol=1e-5 * np.abs(base).max())
        changed = np.abs(pert[:, p:] - base[:, p:]).max(axis=-1)  # [B, N - p]
        assert np.all(changed > 1e-6), f"{name}: perturbing token {p} did not reach all later positions"

    # gradients w.r.t. the embedded inputs
    x = model.apply({"params": params}, tokens, method=lambda m, t: m.embed_tokens(t))
    r = jnp.asarray(np.random.default_rng(2).standard_normal(V), jnp.float32)

    @jax.jit
    def grad_at(x, p):
        def f(x):
            logits = model.apply({"params": params}, x, method=lambda m, x: m.logits(m.hidden(x)))
            return jnp.sum(jnp.take(logits, p, axis=1) @ r)

        return jax.grad(f)(x)

    for p in (0, 6, N - 1):
        g = np.abs(np.asarray(grad_at(x, p))).max(axis=(0, 2))  # [N]
        assert np.all(g[: p + 1] > 0), f"{name}: no gradient from some position <= {p}"
        if exact:
            assert np.all(g[p + 1 :] == 0), f"{name}: gradient leaks from the future at {p}"
        else:
            assert np.all(g[p + 1 :] <= 1e-5 * g[: p + 1].max())


def _n_params(tree):
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _flat_mixer_count(v, n, d, l, tied=False):
    block = (n * n + n) + (8 * d * d + 5 * d) + 4 * d  # docs/masked_mixers.md#parameter-counts
    return l * block + (1 if tied else 2) * v * d


def _shape_params(model, n):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, n), jnp.int32))
    return shapes["params"]


def test_flat_param_count_formula():
    params = _init(build_model(tiny_cfg()))
    assert _n_params(params) == _flat_mixer_count(V, N, D, L)
    params = _init(build_model(tiny_cfg(tie_embeddings=True)))
    assert _n_params(params) == _flat_mixer_count(V, N, D, L, tied=True)


@pytest.mark.parametrize(
    "d,l,n,v,heads,millions",
    [
        (1024, 8, 512, 4096, 0, 77.7),  # TinyStories d1024
        (512, 8, 512, 4096, 0, 23.1),
        (1024, 16, 512, 8000, 0, 155.0),  # FineWeb
        (512, 16, 512, 8000, 0, 46.0),
        (1024, 16, 1024, 8000, 4, 251.5),  # 4-head
    ],
)
def test_reference_table_param_counts(d, l, n, v, heads, millions):
    """The table of docs/masked_mixers.md#parameter-counts, without allocating (jax.eval_shape)."""
    model = build_model(tiny_cfg(d_model=d, n_layers=l, n_ctx=n, vocab_size=v, heads=heads))
    params = _shape_params(model, n)
    total = _n_params(params)
    assert round(total / 1e6, 1) == millions
    if heads == 0:
        assert total == _flat_mixer_count(v, n, d, l)
        assert _n_params(params["block_0"]["mix"]) == n * n + n
        if (d, n) == (1024, 512):  # "8.66M per block; 262,656 of it token mixing"
            assert n * n + n == 262_656
            assert round(_n_params(params["block_0"]) / 1e6, 2) == 8.66
    else:
        mix = _n_params(params["block_0"]["mix"])
        assert mix == heads * (n * n + n) + heads * (d * d // heads + d // heads) + d * d + d
        assert round(mix / 1e6, 2) == 6.30


def test_transformer_param_count():
    """d512 L16 H4 Llama ≈ 75.3M params at V8000 (docs/transformer_baseline.md#published-configurations)."""
    cfg = tiny_cfg(kind="transformer", d_model=512, n_layers=16, n_heads=4, vocab_size=8000, n_ctx=512)
    total = _n_params(_shape_params(build_model(cfg), 512))
    assert round(total / 1e6, 1) == 75.3


def _gpt_count(v, n, d, l, r=4):
    """Original GPT (models/transformer.py): V·d + n·d + L·(4d² + 4d + 2r·d² + r·d + d + 4d) + 2d + d·V."""
    return v * d + n * d + l * (4 * d * d + 4 * d + 2 * r * d * d + r * d + d + 4 * d) + 2 * d + d * v


def test_gpt_param_count_formula():
    """Every tensor of the GPT tree is where the formula puts it; the published d512 L8 H4 n512
    shape at V4096 (tinystories) is 29.7M parameters."""
    params = _init(build_model(tiny_cfg(kind="transformer", transformer="gpt", n_heads=4)))
    assert _n_params(params) == _gpt_count(V, N, D, L)
    block = params["block_0"]
    assert set(block["attn"]["q"]) == {"kernel", "bias"} and set(block["mlp"]["fc1"]) == {"kernel", "bias"}
    assert set(block["attn_norm"]) == {"scale", "bias"} and "bias" not in params["head"]
    assert params["pos_embed"]["embedding"].shape == (N, D)
    cfg = tiny_cfg(kind="transformer", transformer="gpt", d_model=512, n_layers=8, n_heads=4,
                   vocab_size=4096, n_ctx=512)
    total = _n_params(_shape_params(build_model(cfg), 512))
    assert total == _gpt_count(4096, 512, 512, 8)
    assert round(total / 1e6, 1) == 29.7


def test_gpt_positions_are_learned():
    """GPT logits depend on the learned position table; shifting the table changes them."""
    model = build_model(tiny_cfg(kind="transformer", transformer="gpt", n_heads=4))
    params = _init(model)
    tokens = _tokens(1)
    base = model.apply({"params": params}, tokens)
    table = params["pos_embed"]["embedding"]
    rolled = {**params, "pos_embed": {"embedding": jnp.roll(table, 1, axis=0)}}
    assert np.abs(np.asarray(model.apply({"params": rolled}, tokens) - base)).max() > 1e-3


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logical_partitioning_on_every_param(name):
    model = build_model(tiny_cfg(**VARIANTS[name]))
    boxed = _shape_params(model, N)
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= set(layers.LOGICAL_AXES), leaf.names
        assert leaf.value.dtype == jnp.float32


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
def test_bf16_compute_gives_fp32_logits(kind):
    m32 = build_model(tiny_cfg(kind=kind))
    m16 = build_model(tiny_cfg(kind=kind, dtype="bfloat16"))
    params = _init(m32)
    tokens = _tokens(3)
    l32 = m32.apply({"params": params}, tokens)
    l16 = m16.apply({"params": params}, tokens)
    assert l32.dtype == jnp.float32 and l16.dtype == jnp.float32
    diff = float(jnp.abs(l16 - l32).max())
    assert 0 < diff < 0.05 * float(jnp.abs(l32).max())  # really computed in bf16, and close


def _ln(x, g, b, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * g + b


def _gelu(x, exact):
    if exact:
        return 0.5 * x * (1 + erf(x / np.sqrt(2)))
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _hand_mixer_forward(p, tokens, eps, exact_gelu):
    """One flat mixer block + head written out in float64 (docs/masked_mixers.md#the-mixer-block)."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f64(p["embed"]["embedding"])[np.asarray(tokens)]
    b = p["block_0"]
    h = _ln(x, f64(b["ln_mix"]["scale"]), f64(b["ln_mix"]["bias"]), eps)
    w = np.tril(f64(b["mix"]["w"]))
    x = x + np.einsum("ij,bjd->bid", w, h) + f64(b["mix"]["c"])[None, :, None]
    h = _ln(x, f64(b["ln_ffn"]["scale"]), f64(b["ln_ffn"]["bias"]), eps)
    ff = b["ffn"]
    h = _gelu(h @ f64(ff["fc1"]["kernel"]) + f64(ff["fc1"]["bias"]), exact_gelu)
    x = x + h @ f64(ff["fc2"]["kernel"]) + f64(ff["fc2"]["bias"])
    return x @ f64(p["head"]["kernel"])  # no final norm


@pytest.mark.parametrize("reference", [True, False])
def test_reference_numerics_against_hand_formula(reference):
    """LayerNorm eps 1e-5 and exact-erf GELU (reference) / tanh GELU (not), checked discriminatively."""
    model = build_model(tiny_cfg(n_layers=1, reference=reference))
    params = _init(model)
    # tiny embeddings (variance ~1e-6) make the LayerNorm eps visible; a large FFN input scale makes
    # the GELU form visible.
    params["embed"]["embedding"] = params["embed"]["embedding"] * 1e-3 / params["embed"]["embedding"].std()
    params["block_0"]["ffn"]["fc1"]["kernel"] = params["block_0"]["ffn"]["fc1"]["kernel"] * 10.0
    tokens = _tokens(4)
    out = np.asarray(model.apply({"params": params}, tokens), np.float64)
    scale = np.abs(out).max()

    def err(eps, exact):
        return np.abs(out - _hand_mixer_forward(params, tokens, eps, exact)).max() / scale

    assert err(1e-5, reference) < 2e-6
    assert err(1e-6, reference) > 1e-3  # a different eps would be detected
    assert err(1e-5, not reference) > 1e-5  # the other GELU form would be detected (~5e-5)


def test_reference_inits():
    params = _init(build_model(tiny_cfg(n_ctx=64, d_model=64, vocab_size=512)), n=64)
    emb = np.asarray(params["embed"]["embedding"])
    assert 0.9 < emb.std() < 1.1  # N(0, 1)
    fc1 = np.asarray(params["block_0"]["ffn"]["fc1"]["kernel"])
    assert np.abs(fc1).max() <= 1 / 8 and np.abs(fc1).max() > 0.9 / 8  # U(±1/sqrt(64))
    fc2b = np.asarray(params["block_0"]["ffn"]["fc2"]["bias"])
    assert np.abs(fc2b).max() <= 1 / 16 and np.any(fc2b != 0)  # U(±1/sqrt(256))
    assert np.all(np.asarray(params["block_0"]["ln_mix"]["scale"]) == 1)
    w = np.asarray(params["block_0"]["mix"]["w"])
    assert np.abs(w).max() <= 1 / 8
    params = _init(build_model(tiny_cfg(n_ctx=64, d_model=64, vocab_size=512, reference=False)), n=64)
    assert 0.018 < float(np.std(params["embed"]["embedding"])) < 0.022
    assert np.all(np.asarray(params["block_0"]["ffn"]["fc1"]["bias"]) == 0)


def test_transformer_shorter_input():
    model = build_model(tiny_cfg(kind="transformer"))
    params = _init(model)
    out = model.apply({"params": params}, _tokens(5, n=10))
    assert out.shape == (2, 10, V) and out.dtype == jnp.float32
    # a prefix gives the same logits as the full sequence at those positions (causal + RoPE)
    full = model.apply({"params": params}, _tokens(5, n=N))
    part = model.apply({"params": params}, _tokens(5, n=N)[:, :10])
    np.testing.assert_allclose(np.asarray(part), np.asarray(full[:, :10]), rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError):
        model.apply({"params": params}, _tokens(5, n=N + 1))


def test_mixer_requires_n_ctx_tokens():
    model = build_model(tiny_cfg())
    params = _init(model)
    with pytest.raises(UserError, match="n_ctx"):
        model.apply({"params": params}, _tokens(5, n=N - 1))


@pytest.mark.parametrize(
    "overrides",
    [
        dict(kind="rnn"),
        dict(mixing="flat", mixing_impl="fft"),
        dict(mixing="circulant"),
        dict(heads=3),
        dict(mask_grad="nope"),
        dict(mixing="toeplitz", mask_grad="straight_through"),
        dict(kind="transformer", n_heads=3),
        dict(dtype="float64"),
        dict(kernel=0),
        dict(kernel=4, mixing="toeplitz"),
        dict(kernel=2, mixing="mixed", heads=2, block="srm"),
        dict(causal=False, mixing="row", block="srm"),
        dict(causal=False, mask_grad="straight_through"),
        dict(kind="transformer", kernel=4),
        dict(kind="transformer", transformer="bert"),
    ],
)
def test_bad_configs_raise_user_error(overrides):
    with pytest.raises(UserError) as info:
        build_model(tiny_cfg(**overrides))
    assert "\n" not in str(info.value)


# kernel mixing (docs/masked_mixers.md#kernel-mixing): the causality test above, per-tap mask, bit-exact
KERNEL_VARIANTS = {
    "flat_kernel4": dict(kernel=4),
    "flat_kernel3_headed": dict(kernel=3, heads=2),
    "flat_kernel2_expanded_straight_through": dict(kernel=2, expanded=True, mask_grad="straight_through"),
}


@pytest.mark.parametrize("name", list(KERNEL_VARIANTS))
def test_causality_kernel(name, monkeypatch):
    monkeypatch.setitem(VARIANTS, name, KERNEL_VARIANTS[name])
    test_causality(name)


UNMASKED_VARIANTS = {
    "flat": dict(causal=False),
    "flat_headed_kernel": dict(causal=False, heads=2, kernel=3),
    "toeplitz": dict(causal=False, mixing="toeplitz"),
    "toeplitz_fft_headed": dict(causal=False, mixing="toeplitz", mixing_impl="fft", heads=2),
    "transformer": dict(kind="transformer", n_heads=4, causal=False),
    "gpt": dict(kind="transformer", transformer="gpt", n_heads=4, causal=False),
}


@pytest.mark.parametrize("name", list(UNMASKED_VARIANTS))
def test_unmasked_outputs_depend_on_every_position(name):
    """model.causal=False: the gradient of every output position reaches every input position."""
    model = build_model(tiny_cfg(n_layers=1, **UNMASKED_VARIANTS[name]))
    params = _init(model)
    x = model.apply({"params": params}, _tokens(1), method=lambda m, t: m.embed_tokens(t))
    r = jnp.asarray(np.random.default_rng(2).standard_normal(V), jnp.float32)

    def out(x):
        logits = model.apply({"params": params}, x, method=lambda m, x: m.logits(m.hidden(x)))
        return jnp.sum(logits @ r, axis=0)  # [N]

    dep = np.abs(np.asarray(jax.jacrev(out)(x))).max(axis=(1, 3))  # [out position, in position]
    assert np.all(dep > 0), name


def _stacked(params):
    """Unscanned parameters -> the scan_layers tree (block_{i}/... stacked into blocks/...)."""
    blocks = [params[f"block_{i}"] for i in range(L)]
    rest = {k: v for k, v in params.items() if not k.startswith("block_")}
    return dict(rest, blocks=jax.tree.map(lambda *a: jnp.stack(a), *blocks))


@pytest.mark.parametrize("name", ["flat_headed", "gpt"])
def test_scan_layers_equals_unscanned_blocks(name):
    """model.scan_layers: parameters stacked along a leading 'layers' axis; with the same weights
    the scanned model's logits, gradients and step form equal the unscanned model's (to float
    rounding: XLA compiles the scanned body on its own)."""
    cfg = tiny_cfg(**VARIANTS[name])
    plain = build_model(cfg)
    cfg.scan_layers = True
    scanned = build_model(cfg)
    params = _init(plain)
    stacked = _stacked(params)
    shapes = nn.meta.unbox(_shape_params(scanned, N))
    assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, stacked)
    names = jax.tree_util.tree_leaves(
        jax.tree.map(lambda b: b.names[0], _shape_params(scanned, N)["blocks"],
                     is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)))
    assert set(names) == {"layers"}

    tokens = _tokens(1)

    def loss(model):
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 3])))

    (l0, g0), (l1, g1) = loss(plain)(params), loss(scanned)(stacked)
    assert float(l1) == pytest.approx(float(l0), rel=1e-6)
    for a, b in zip(jax.tree.leaves(_stacked(g0)), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)
    step0 = jax.jit(lambda p, c: plain.apply({"params": p}, tokens[:, 0], 0, c, method="step"))
    step1 = jax.jit(lambda p, c: scanned.apply({"params": p}, tokens[:, 0], 0, c, method="step"))
    (y0, c0), (y1, c1) = step0(params, plain.init_cache(2)), step1(stacked, scanned.init_cache(2))
    np.testing.assert_allclose(np.asarray(y1), np.asarray(y0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(c1)[0][1]),
                               np.asarray(jax.tree.leaves(c0[1])[0]), rtol=1e-5, atol=1e-6)
