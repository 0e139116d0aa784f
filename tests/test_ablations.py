"""Ablation switches (docs/ablations.md): each removes exactly the named parameters and computes the
block it describes; the presets of configs/ablations.py build and differ from their baseline only
in the switch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mixers_jax.config import base_config, load_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, layers
from mixers_jax.models.mixer import MixerBlock
from mixers_jax.models.mixing import TokenMixing
from mixers_jax.models.specs import mixer_spec, transformer_spec
from mixers_jax.models.transformer import Attention, TransformerBlock, mlp, norm

V, N, D, L, B = 64, 16, 32, 2, 2


def tiny_cfg(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, n_ctx=N, d_model=D, n_layers=L, n_heads=4))
    cfg.update(overrides)
    return cfg


def paths(cfg) -> set[str]:
    """'/'-joined parameter paths of the model of ``cfg`` (from shapes only)."""
    model = build_model(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, N), jnp.int32)))
    flat = jax.tree_util.tree_flatten_with_path(nn.meta.unbox(shapes["params"]))[0]
    return {"/".join(str(k.key) for k in p) for p, _ in flat}


def under(names: set[str], *parts: str) -> set[str]:
    """The paths below any block_i/<part> (or a top-level <part>) for each of ``parts``."""
    return {p for p in names if any(f"/{part}/" in f"/{p}" for part in parts)}


MIXER = dict(kind="mixer")
TRANSFORMER = dict(kind="transformer")
GPT = dict(kind="transformer", transformer="gpt")
# (base model, switch, the subtrees the switch removes, names of the subtrees it adds)
REMOVALS = [
    (MIXER, dict(mlp="none"), ("ln_ffn", "ffn"), ()),
    (MIXER, dict(layer_norm=False), ("ln_mix", "ln_ffn"), ()),
    (MIXER, dict(residual=False), (), ()),
    (TRANSFORMER, dict(mlp="none"), ("mlp_norm", "mlp"), ()),
    (TRANSFORMER, dict(layer_norm=False), ("attn_norm", "mlp_norm", "final_norm"), ()),
    (TRANSFORMER, dict(residual=False), (), ()),
    (TRANSFORMER, dict(mlp="attention"), ("mlp",), ("mlp_attn",)),
    (GPT, dict(mlp="attention", layer_norm=False), ("mlp", "attn_norm", "mlp_norm", "final_norm"),
     ("mlp_attn",)),
]


@pytest.mark.parametrize("base,switch,removed,added", REMOVALS,
                         ids=[f"{b.get('transformer', b['kind'])}-{s}" for b, s, _, _ in REMOVALS])
def test_switch_removes_exactly_the_named_parameters(base, switch, removed, added):
    full, ablated = paths(tiny_cfg(**base)), paths(tiny_cfg(**base, **switch))
    assert all(under(full, r) for r in removed)  # each named subtree exists in the baseline
    assert full - ablated == under(full, *removed)
    new = ablated - full
    assert new == under(ablated, *added)
    if added:  # the second attention has exactly the first one's parameters, in every block
        assert {p.replace("mlp_attn", "attn") for p in new} == under(full, "attn")


def _sub(module, params, x):
    return module.apply({"params": params}, x)


def _check_block(block, spec, expected_fn, extra_kw=None):
    x = jax.random.normal(jax.random.key(1), (B, N, D))
    params = nn.meta.unbox(block.init(jax.random.key(2), x)["params"])
    got = block.apply({"params": params}, x, **(extra_kw or {}))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected_fn(params, x)), rtol=1e-6,
                               atol=1e-6)
    return params


MIXER_FORMS = {  # the block each switch setting describes, with Mix, FFN and the two LNs
    "full": (dict(), lambda mix, ffn, ln1, ln2, x: (lambda y: y + ffn(ln2(y)))(x + mix(ln1(x)))),
    "no_mlp": (dict(mlp="none"), lambda mix, ffn, ln1, ln2, x: x + mix(ln1(x))),
    "no_norms": (dict(layer_norm=False), lambda mix, ffn, ln1, ln2, x: (lambda y: y + ffn(y))(x + mix(x))),
    "no_residual": (dict(residual=False), lambda mix, ffn, ln1, ln2, x: ffn(ln2(mix(ln1(x))))),
}


@pytest.mark.parametrize("name", list(MIXER_FORMS))
def test_mixer_block_forward(name):
    switch, form = MIXER_FORMS[name]
    spec = mixer_spec(tiny_cfg(**switch))

    def expected(p, x):
        def mix(z):
            return _sub(TokenMixing(spec.token_mixing), p["mix"], z)

        def ffn(z):
            return _sub(layers.MLP(D, spec.mlp_ratio, spec.reference, spec.dtype), p["ffn"], z)

        def ln(key):
            return lambda z: _sub(layers.layer_norm(spec.dtype), p[key], z)

        return form(mix, ffn, ln("ln_mix") if "ln_mix" in p else None,
                    ln("ln_ffn") if "ln_ffn" in p else None, x)

    _check_block(MixerBlock(spec), spec, expected)


TRANSFORMER_FORMS = {  # Attn, the channel sublayer C, and the two norms
    "full": (dict(), lambda at, c, n1, n2, x: (lambda y: y + c(n2(y)))(x + at(n1(x)))),
    "no_mlp": (dict(mlp="none"), lambda at, c, n1, n2, x: x + at(n1(x))),
    "no_norms": (dict(layer_norm=False), lambda at, c, n1, n2, x: (lambda y: y + c(y))(x + at(x))),
    "no_residual": (dict(residual=False), lambda at, c, n1, n2, x: c(n2(at(n1(x))))),
    "mlp_attention": (dict(mlp="attention"),
                      lambda at, c, n1, n2, x: (lambda y: y + c(n2(y)))(x + at(n1(x)))),
}


@pytest.mark.parametrize("name", list(TRANSFORMER_FORMS))
def test_transformer_block_forward(name):
    switch, form = TRANSFORMER_FORMS[name]
    spec = transformer_spec(tiny_cfg(**switch))

    def expected(p, x):
        def attn(z):
            return _sub(Attention(spec), p["attn"], z)

        def channel(z):
            if spec.mlp == "attention":  # a second attention with its own weights
                return _sub(Attention(spec), p["mlp_attn"], z)
            return _sub(mlp(spec), p["mlp"], z)

        def nrm(key):
            return (lambda z: _sub(norm(spec), p[key], z)) if key in p else None

        return form(attn, channel, nrm("attn_norm"), nrm("mlp_norm"), x)

    params = _check_block(TransformerBlock(spec), spec, expected)
    if spec.mlp == "attention":  # the two attentions are initialised independently
        assert not np.allclose(params["attn"]["q"]["kernel"], params["mlp_attn"]["q"]["kernel"])


def test_transformer_without_norms_has_no_final_norm():
    """hidden() = the blocks' output itself when layer_norm=False."""
    cfg = tiny_cfg(kind="transformer", layer_norm=False)
    model = build_model(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, N)), jnp.int32)
    params = nn.meta.unbox(model.init(jax.random.key(0), tokens)["params"])
    spec = transformer_spec(cfg)
    x = _sub(layers.Embed(V, D, layers.normal(0.02), spec.dtype), params["embed"], tokens)
    for i in range(L):
        x = TransformerBlock(spec).apply({"params": params[f"block_{i}"]}, x)
    h = model.apply({"params": params}, tokens, method=lambda m, t: m.hidden(m.embed_tokens(t)))
    np.testing.assert_allclose(np.asarray(h), np.asarray(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cfg", [dict(kind="mixer", mlp="attention"), dict(kind="transformer", mlp="ffn")])
def test_bad_mlp_switch_is_a_user_error(cfg):
    with pytest.raises(UserError, match="model.mlp must be one of"):
        build_model(tiny_cfg(**cfg))


PRESETS = {  # preset -> the model fields it changes against its family's baseline preset
    "transformer_no_mlp": {"mlp": "none"},
    "transformer_no_norms": {"layer_norm": False},
    "transformer_no_residuals": {"residual": False},
    "transformer_mlp_attention": {"mlp": "attention"},
    "mixer_no_mlp": {"mlp": "none"},
    "mixer_no_norms": {"layer_norm": False},
    "mixer_no_residuals": {"residual": False},
}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_differ_from_their_baseline_only_in_the_switch(preset):
    base = load_config(f"configs/ablations.py:{preset.split('_')[0]}")
    ablated = load_config(f"configs/ablations.py:{preset}")
    assert ablated.train.on_divergence == base.train.on_divergence == "record"
    for section in ("data", "train"):
        assert ablated[section].to_dict() == base[section].to_dict()
    diff = {k: v for k, v in ablated.model.to_dict().items() if base.model.to_dict()[k] != v}
    assert diff == PRESETS[preset]
    build_model(ablated.model)


def test_every_ablation_preset_is_tested():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ablations_config", "configs/ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.PRESETS) == set(PRESETS) | {"mixer", "transformer"}
