"""Analysis probes (mixers_jax/inversion.py, entropy.py, attribution.py, probe.py): inversion is exact
for identity blocks and at chance for blocks that ignore their input; the shifting entropy equals
the conditional entropy of a model known in closed form; an unused memory slot gets zero
attribution; gradient × input matches finite differences; the entropy-weighted objective; bad input.
"""
import functools
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers_jax import attribution, entropy, inversion, objectives, probe
from mixers_jax.config import base_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from run_util import make_workdir
from tests_util import exit_status

V, N, D = 48, 8, 32


def _model(**overrides):
    cfg = base_config().model
    cfg.update(dict(vocab_size=V, n_ctx=N, d_model=D, n_layers=2, n_heads=2))
    cfg.update(overrides)
    model = build_model(cfg)
    length = N * cfg.chunks if cfg.kind == "memory" else N
    init = jax.jit(lambda r: model.init(r, jnp.zeros((1, length), jnp.int32))["params"])
    params = nn.meta.unbox(init(jax.random.key(0)))
    return cfg, model, params


def _zero(params, *names):
    """params with every leaf whose path contains one of ``names`` set to 0."""
    def f(path, x):
        keys = "/".join(str(getattr(k, "key", k)) for k in path)
        return jnp.zeros_like(x) if any(n in keys for n in names) else x
    return jax.tree_util.tree_map_with_path(f, params)


def _tokens(rows=2, length=N, seed=1):
    return np.random.default_rng(seed).integers(3, V, size=(rows, length)).astype(np.int32)


# --------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("kind,zeroed,depths", [("mixer", ("mix/", "ffn/fc2"), [1, 2]),
                                                ("transformer", ("attn/o", "mlp/down"), [2])])
def test_inversion_of_identity_blocks_is_exact(kind, zeroed, depths):
    """Blocks whose branches output 0 are the identity: every token comes back (error 0)."""
    _, model, params = _model(kind=kind)
    params = _zero(params, *zeroed)
    tokens = _tokens()
    x = model.apply({"params": params}, jnp.asarray(tokens), method="embed_tokens")
    np.testing.assert_array_equal(model.apply({"params": params}, x, 2, method="blocks_output"), x)
    recs = inversion.invert_depths(model, params, tokens, tokens != 2, depths)
    assert [r["error"] for r in recs] == [0.0] * len(depths)
    assert all(r["l1_final"] < 0.05 * r["l1_start"] for r in recs)


def test_inversion_of_input_ignoring_blocks_is_chance():
    """No residual and a zero second FFN layer: the output is a constant, the gradient zero, and the
    recovered tokens are the random start's (error near 1 − 5/V)."""
    _, model, params = _model(residual=False)
    params = _zero(params, "ffn/fc2/kernel")
    tokens = _tokens(rows=4)
    recs = inversion.invert_depths(model, params, tokens, np.ones_like(tokens), [2],
                                   inversion.Schedule(steps=20))
    for r in recs:
        assert r["l1_final"] == r["l1_start"] == 0.0
        assert 0.75 <= r["error"] <= 1.0


def test_blocks_output_is_hidden_before_the_final_norm():
    for kind in ("mixer", "transformer"):
        _, model, params = _model(kind=kind)
        v = {"params": params}
        x = model.apply(v, jnp.asarray(_tokens()), method="embed_tokens")
        h = model.apply(v, x, method="hidden")
        full = model.apply(v, x, 2, method="blocks_output")
        if kind == "transformer":
            full = model.apply(v, full, method=lambda m, y: m.final_norm(y))
        np.testing.assert_array_equal(h, full)
        np.testing.assert_array_equal(model.apply(v, x, 0, method="blocks_output"), x)
        with pytest.raises(UserError, match="outside 0..2"):
            model.apply(v, x, 3, method="blocks_output")


def test_hamming_error_counts_top5_misses_on_valid_positions():
    scores = jnp.asarray(np.tile(np.arange(10.0), (1, 3, 1)))  # top 5 = tokens 5..9
    tokens = jnp.asarray([[9, 0, 1]])
    assert inversion.hamming_error(scores, tokens, jnp.asarray([[1, 1, 0]])) == (0.5, 2)


# --------------------------------------------------------------------------- entropy


def _closed_form(seed=0, k_max=12):
    """logits_i = A[t_i] + B[c_i], c_i = non-pad tokens at positions ≤ i: predictions depend on the
    prefix only, whatever the left padding."""
    rng = np.random.default_rng(seed)
    a, b = jnp.asarray(rng.normal(size=(V, V))), jnp.asarray(rng.normal(size=(k_max + 1, V)))

    def logits_fn(tokens_BxN):
        count = jnp.cumsum(tokens_BxN != 2, axis=1)
        return (a[tokens_BxN] + b[jnp.minimum(count, k_max)]).astype(jnp.float32)

    def direct(tokens):
        out, prev = [], 2
        for j, t in enumerate(tokens):
            logp = jax.nn.log_softmax(a[prev] + b[min(j, k_max)])
            out.append(-float(logp[t]))
            prev = t
        return np.asarray(out)

    return logits_fn, direct


def test_shifting_entropy_equals_the_closed_form_conditional_entropy():
    logits_fn, direct = _closed_form()
    text = [int(t) for t in _tokens(1, 7)[0]]
    s = entropy.summed_nll_fn(logits_fn, pad_id=2, batch=4)
    got = entropy.conditional_entropies(text, 2, s, N)
    np.testing.assert_allclose(got["entropy"], direct(text), rtol=1e-5, atol=1e-5)
    # two-model form: the same predictor at contexts n and n − 1
    two = entropy.conditional_entropies(text, 2, s, N, s, N - 1)
    np.testing.assert_allclose(two["entropy"], direct(text), rtol=1e-5, atol=1e-5)
    assert got["s_long"][-1] == pytest.approx(direct(text).sum(), rel=1e-5)


def test_entropy_text_limits():
    s = entropy.summed_nll_fn(_closed_form()[0], pad_id=2)
    with pytest.raises(UserError, match="longer than the context"):
        entropy.conditional_entropies(list(range(3, 3 + N)), 2, s, N)  # n tokens: no leading pad
    with pytest.raises(UserError, match="at most 6"):
        entropy.conditional_entropies(list(range(3, 10)), 2, s, N, s, N - 2)
    with pytest.raises(UserError, match="not a causal LM"):
        entropy.check_entropy_model({"kind": "memory", "n_ctx": N})


# --------------------------------------------------------------------------- attribution


def test_occlusion_of_an_unused_slot_is_zero_and_causal():
    """Memory mixer, 3 chunks: zeroing every decoder mixing weight that reads slot 1 makes that
    slot unused (occlusion and noise-shift scores 0); slot 0 changes only chunks 1 and 2."""
    cfg, model, params = _model(kind="memory", chunks=3, encoder={"d_model": 16})
    dec = params["decoder"]
    for name in dec:
        if name.startswith("block_"):
            w = dec[name]["mix"]["w"]
            dec[name]["mix"]["w"] = w.at[..., 1].set(0.0)
    access = attribution.memory_access(cfg, attribution.bare_apply(model))
    tokens = jnp.asarray(_tokens(2, 3 * N))
    @functools.partial(jax.jit, static_argnums=2)
    def scores(p, t, slot):
        return dict(attribution.occlusion(access, p, t, slot),
                    noise=attribution.noise_shift(access, p, t, jax.random.key(0), slot))

    for k, v in scores(params, tokens, 1).items():
        np.testing.assert_array_equal(np.asarray(v), 0.0, err_msg=k)
    used = scores(params, tokens, 0)["l1"]
    assert np.all(np.asarray(used[:, :N]) == 0.0)  # chunk 0 never sees m_0
    assert np.all(np.asarray(used[:, N:]) > 0.0)


def test_gradient_x_input_matches_finite_differences():
    cfg, model, params = _model(kind="embedding_clm", encoder={"d_model": 16}, compression=2)
    access = attribution.memory_access(cfg, attribution.bare_apply(model))
    tokens = jnp.asarray(_tokens(1))
    vectors, scores = jax.jit(lambda p, t: attribution.gradient_x_input(access, p, t))(params, tokens)
    m = access.memory(params, tokens)
    eps = 3e-3
    sums = jax.jit(jax.vmap(lambda mm: attribution.abs_logit_sums(access, params, tokens, mm)[0]))
    steps = jnp.eye(m.shape[-1])[:, None, None, :] * eps  # one coordinate of m each
    fd = np.asarray((sums(m[None] + steps) - sums(m[None] - steps)) / (2 * eps)).T  # [L, D]
    fd = fd * np.asarray(m[0, 0])[None, :]
    scale = np.abs(fd).max()
    np.testing.assert_allclose(np.asarray(vectors[0]), fd, atol=2e-2 * scale)
    np.testing.assert_allclose(np.asarray(scores[0]), np.abs(fd).sum(-1), rtol=3e-2)


def test_attribution_needs_a_memory():
    with pytest.raises(UserError, match="no memory"):
        attribution.memory_access(_model()[0], None)
    with pytest.raises(UserError, match="no-memory control"):
        attribution.memory_access(_model(kind="memory", chunks=2, use_memory=False)[0], None)


def test_normalization_and_shift():
    s = jnp.asarray([[3.0, 1.0, 2.0, 9.0]])
    np.testing.assert_allclose(attribution.min_max(s, jnp.asarray([[1, 1, 1, 0]])), [[1, 0, 0.5, 0]])
    shifted = np.asarray(attribution.to_tokens(jnp.asarray([[1.0, 2, 3, 4]]), chunks=2))
    np.testing.assert_array_equal(shifted, [[np.nan, 1, np.nan, 3]])


# --------------------------------------------------------------------------- objective


def test_entropy_weighted_clm_weights_and_reduces_to_clm():
    cfg, model, params = _model(kind="embedding_clm", encoder={"d_model": 16}, compression=2)
    ctx = objectives.ObjectiveContext(model=cfg, train=base_config().train, pad_id=2)
    weighted = objectives.build("entropy_weighted_clm", ctx)
    tokens = _tokens(2)
    batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.ones(tokens.shape),
             "token_bytes": jnp.ones(tokens.shape, jnp.int32)}
    apply_fn = attribution.bare_apply(model)
    clm_loss, clm_sums = objectives.build("clm", ctx)(apply_fn, params, batch)
    loss, sums = weighted(apply_fn, params, batch)
    assert float(sums["nll"]) == pytest.approx(float(clm_sums["nll"]), rel=1e-6)
    assert 0 < float(loss) < float(clm_loss)  # weights in [0, 1], the most attributed one 0
    assert 0 < float(sums["weight"]) < float(sums["tokens"])
    blind = dict(params, bottleneck=_zero(params["bottleneck"], ""))  # memory = 0 = occluded
    loss_b, _ = weighted(apply_fn, blind, batch)
    assert float(loss_b) == pytest.approx(float(objectives.build("clm", ctx)(apply_fn, blind, batch)[0]),
                                          rel=1e-6)
    with pytest.raises(UserError, match="embedding_clm"):
        objectives.build("entropy_weighted_clm",
                         objectives.ObjectiveContext(model=_model()[0], train=ctx.train))


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    return {
        "mixer": make_workdir(str(root / "mixer")),
        "eclm": make_workdir(str(root / "eclm"), kind="embedding_clm", encoder={"d_model": 16},
                             compression=2),
    }


def test_probe_command_writes_results(workdirs, tmp_path):
    out = str(tmp_path / "inv")
    assert exit_status(probe, ["probe", "--what=inversion", f"--workdir={workdirs['mixer']}",
                               "--samples=1", "--steps=5", "--depths=1", f"--out={out}"]) == 0
    res = json.loads(open(out + ".json").read())["results"]
    assert [r["depth"] for r in res[0]["records"]] == [1] and open(out + ".png", "rb").read(4) == b"\x89PNG"
    both = str(tmp_path / "both")
    assert exit_status(probe, ["probe", "--what=inversion", f"--workdir={workdirs['mixer']}",
                               "--untrained", "--samples=1", "--steps=5", "--depths=1",
                               f"--include={out}.json", f"--out={both}"]) == 0
    res = json.loads(open(both + ".json").read())["results"]
    assert [r["untrained"] for r in res] == [False, True]
    for what in ("entropy", "attribution"):
        prefix = str(tmp_path / what)
        assert exit_status(probe, ["probe", f"--what={what}", f"--workdir={workdirs['eclm']}",
                                   "--text=import json", f"--out={prefix}"]) == 0
        rec = json.loads(open(prefix + ".json").read())
        assert rec["pieces"] and open(prefix + ".png", "rb").read(4) == b"\x89PNG"
    assert len(rec["on_tokens"]["l1"]) == len(rec["tokens"]) and rec["on_tokens"]["l1"][0] is None


@pytest.mark.parametrize("what,extra,message", [
    ("inversion", ["eclm"], "no single token embedding"),
    ("inversion", ["mixer", "--depths=3"], "larger than the model's depth 2"),
    ("attribution", ["mixer"], "no memory"),
    ("attribution", ["eclm", "--text=" + "word " * 40], "longer than the context"),
    ("entropy", ["eclm", "--text=" + "word " * 40], "longer than the context"),
    ("entropy", ["eclm", "--out="], "needs --out"),
])
def test_probe_bad_input_is_one_line(workdirs, tmp_path, capsys, what, extra, message):
    out = str(tmp_path / "o")
    argv = ["probe", f"--what={what}", f"--workdir={workdirs[extra[0]]}", f"--out={out}", *extra[1:]]
    assert exit_status(probe, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert os.listdir(tmp_path) == []
