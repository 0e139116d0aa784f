"""Mixer block variants (docs/masked_mixers.md#other-block-variants): parallel mixers
(``model.parallel_mixers``), the softmax mixer (``model.softmax_mixer``) and the positional channel
(``model.position_channel``). Their step forms and causality are in tests/test_step_forms.py and
tests/test_models.py, their FLOPs against XLA in tests/test_flops.py; here: the default staying
bit-identical, each block against its definition, bad values, presets."""
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax import flops
from mixers_jax.config import base_config, load_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, layers
from tests_util import config_path

V, N, D, B = 64, 16, 32, 2


def tiny_cfg(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, n_ctx=N, d_model=D, n_layers=1))
    cfg.update(overrides)
    return cfg


def _init(model, seed=0):
    key = jax.random.key(seed, impl="unsafe_rbg")
    return nn.meta.unbox(model.init(key, jnp.zeros((1, N), jnp.int32))["params"])


def _tokens(seed=1):
    return jnp.asarray(np.random.default_rng(seed).integers(0, V, (B, N)), jnp.int32)


def _digest(tree) -> str:
    """sha256 over the parameter paths, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)}{a.shape}{a.dtype}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def test_defaults_are_the_plain_mixer_bit_for_bit():
    """parallel_mixers=1, softmax_mixer=False, position_channel=False build the parameter tree and
    logits of a config without the fields (same hashes)."""
    cfg = tiny_cfg()
    keys = ("parallel_mixers", "softmax_mixer", "position_channel")
    assert (cfg.parallel_mixers, cfg.softmax_mixer, cfg.position_channel) == (1, False, False)
    legacy = {k: v for k, v in cfg.to_dict().items() if k not in keys}
    a, b = build_model(cfg), build_model(legacy)
    pa, pb = _init(a), _init(b)
    assert _digest(pa) == _digest(pb)
    tokens = _tokens()
    la, lb = a.apply({"params": pa}, tokens), b.apply({"params": pb}, tokens)
    assert hashlib.sha256(np.asarray(la).tobytes()).hexdigest() == \
        hashlib.sha256(np.asarray(lb).tobytes()).hexdigest()


def _ln(p, h):
    mu = h.mean(-1, keepdims=True)
    var = ((h - mu) ** 2).mean(-1, keepdims=True)
    return (h - mu) / jnp.sqrt(var + 1e-5) * p["scale"][None, None] + p["bias"][None, None]


def _mix(p, h):  # flat causal mixing: y_i = Σ_{j<=i} W_ij h_j + c_i
    return jnp.einsum("ij,bjd->bid", jnp.tril(p["w"]), h) + p["c"][None, :, None]


def _hidden(cfg, params, tokens):
    model = build_model(cfg)
    x = model.apply({"params": params}, tokens, method="embed_tokens")
    return x, model.apply({"params": params}, x, method="hidden")


def test_parallel_mixers_block_is_its_definition():
    """x <- x + Σ_p Mix_p(LN_p x) with P own norms and matrices (no MLP here, so the block is the
    mixing sublayer alone); the norms differ, so P matrices are not one matrix."""
    cfg = tiny_cfg(parallel_mixers=3, mlp="none")
    params = _init(build_model(cfg))
    blk = params["block_0"]
    assert set(blk) == {"ln_mix", "ln_mix_1", "ln_mix_2", "mix", "mix_1", "mix_2"}
    # give the norms distinct affine maps (they start equal)
    rng = np.random.default_rng(3)
    blk = {k: ({n: jnp.asarray(rng.normal(size=v.shape), jnp.float32) for n, v in p.items()}
               if k.startswith("ln") else p) for k, p in blk.items()}
    params = {**params, "block_0": blk}
    x, got = _hidden(cfg, params, _tokens())
    want = x + sum(_mix(blk[m], _ln(blk[ln], x)) for m, ln in
                   (("mix", "ln_mix"), ("mix_1", "ln_mix_1"), ("mix_2", "ln_mix_2")))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_softmax_mixer_block_is_its_definition():
    """x <- x + softmax over features of Mix(LN x): each position adds a probability vector."""
    cfg = tiny_cfg(softmax_mixer=True, mlp="none")
    params = _init(build_model(cfg))
    blk = params["block_0"]
    x, got = _hidden(cfg, params, _tokens())
    want = x + jax.nn.softmax(_mix(blk["mix"], _ln(blk["ln_mix"], x)), axis=-1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    added = np.asarray(got - x)
    assert added.min() > 0
    np.testing.assert_allclose(added.sum(-1), 1.0, rtol=1e-5)


def test_position_channel_is_reinserted_before_every_block():
    """Each block first sets feature d−1 of row i to i − n/2 ∈ [−n/2, n/2): a position-channel model
    equals the plain model run on inputs whose last feature is overwritten before each block, and
    nothing the embedding or an earlier block writes into that feature reaches the logits."""
    cfg = tiny_cfg(position_channel=True, n_layers=2)
    model, plain = build_model(cfg), build_model(tiny_cfg(n_layers=2))
    params = _init(model)
    assert _digest(jax.tree.map(jnp.shape, params)) == \
        _digest(jax.tree.map(jnp.shape, _init(plain)))  # same width, same parameters
    x = model.apply({"params": params}, _tokens(), method="embed_tokens")
    positions = jnp.arange(N, dtype=jnp.float32) - N // 2
    assert positions.min() == -N / 2 and positions.max() == N / 2 - 1
    block = jax.jit(lambda p, h: plain.apply({"params": {"block_0": p}}, h, 1,
                                             method="blocks_output"))
    h = x
    for i in range(2):
        h = block(params[f"block_{i}"], h.at[:, :, -1].set(positions))
    hidden = jax.jit(lambda x: model.apply({"params": params}, x, method="hidden"))
    np.testing.assert_allclose(hidden(x), h, rtol=1e-6, atol=1e-6)
    grad = np.asarray(jax.jit(jax.grad(lambda x: hidden(x).sum()))(x))
    assert np.all(grad[..., -1] == 0) and np.abs(grad[..., :-1]).max() > 0


def test_position_channel_has_no_sliding_step():
    model = build_model(tiny_cfg(position_channel=True, mixing="toeplitz"))
    assert not model.slides and build_model(tiny_cfg(mixing="toeplitz")).slides


def test_parallel_mixers_flops_count_p_mixings():
    base = flops.flops_per_token(tiny_cfg(mixing_impl="dense"), training=False)
    got = flops.flops_per_token(tiny_cfg(mixing_impl="dense", parallel_mixers=3), training=False)
    assert got == base + 2 * 2 * N * D
    for key in ("softmax_mixer", "position_channel"):  # elementwise only
        assert flops.flops_per_token(tiny_cfg(mixing_impl="dense", **{key: True}),
                                     training=False) == base


@pytest.mark.parametrize("overrides,match", [
    (dict(parallel_mixers=0), "parallel_mixers must be an integer >= 1"),
    (dict(parallel_mixers=True), "parallel_mixers must be an integer >= 1"),
    (dict(parallel_mixers=2.0), "parallel_mixers must be an integer >= 1"),
    (dict(position_channel=True, d_model=1, mlp_ratio=1), "d_model >= 2"),
    (dict(kind="transformer", n_heads=4, softmax_mixer=True), "masked-mixer block option"),
    (dict(kind="transformer", n_heads=4, parallel_mixers=2), "masked-mixer block option"),
    (dict(bidirectional=True, position_channel=True), "needs the plain flat mixer"),
])
def test_bad_block_variant_configs(overrides, match):
    with pytest.raises(UserError, match=match):
        build_model({**tiny_cfg().to_dict(), **overrides})


@pytest.mark.parametrize("preset,key,value", [("parallel_mixers", "parallel_mixers", 2),
                                              ("softmax_mixer", "softmax_mixer", True),
                                              ("position_channel", "position_channel", True)])
def test_presets_are_the_mixer_cpu_budget_plus_the_switch(preset, key, value):
    cfg, smoke = (load_config(config_path("variants", p)) for p in (preset, "smoke_" + preset))
    mixer = load_config(config_path("mixer_clm", "cpu"))
    assert cfg.model[key] == value and smoke.model[key] == value
    want = mixer.to_dict()
    want["model"][key] = value
    got = cfg.to_dict()
    assert got["model"] == want["model"] and got["train"] == want["train"]
    assert got["data"] == want["data"]
