"""The embedding matcher (kind 'matcher') and the match objectives: candidate-order equivariance,
the loss against a hand computation, config checks."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mixers_jax import objectives
from mixers_jax.config import base_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model, example_input


def _matcher_cfg(pool=8, d=16, **kw):
    cfg = base_config()
    cfg.model.update(dict(kind="matcher", n_ctx=pool + 1, d_model=d, n_layers=2, causal=False,
                          vocab_size=8, **kw))
    return cfg


def _init(cfg, seed=0):
    model = build_model(cfg.model)
    params = model.init(jax.random.key(seed), example_input(cfg.model))["params"]
    return model, nn.meta.unbox(params)


def test_parameters_have_no_token_embedding_and_a_scalar_score():
    model, params = _init(_matcher_cfg())
    assert "embed" not in params and "head" not in params
    assert params["score"]["kernel"].shape == (16, 1) and params["score"]["bias"].shape == (1,)
    assert params["block_0"]["mix"]["w"].shape == (9, 9)
    x = jax.random.normal(jax.random.key(1), (3, 9, 16))
    assert model.apply({"params": params}, x).shape == (3, 8)


@pytest.mark.parametrize("heads", [0, 2])
def test_permuting_candidates_permutes_scores(heads):
    """The unmasked mixing reads every position, so scores depend on the candidates, not their
    order: s(π(c)) = π(s(c)) for a permutation π of the candidates."""
    cfg = _matcher_cfg(heads=heads)
    model, params = _init(cfg)
    # Positions carry their own mixing weights and biases, so equivariance needs position-
    # independent mixing: give every block's mixing matrix equal entries and its bias one value
    # (it still mixes every candidate into each); everything else is position-wise as trained.
    def symmetric(path, v):
        name = jax.tree_util.keystr(path)
        if "['mix']" in name and name.endswith(("['w']", "['c']")):
            return jnp.full_like(v, 0.1)
        return v

    params = jax.tree_util.tree_map_with_path(symmetric, params)
    x = jax.random.normal(jax.random.key(2), (2, 9, 16))
    perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
    xp = x.at[:, 1:].set(x[:, 1 + perm])
    s, sp = (model.apply({"params": params}, v) for v in (x, xp))
    np.testing.assert_allclose(np.asarray(sp), np.asarray(s)[:, perm], rtol=1e-5, atol=1e-5)
    # and the scores do depend on the candidates themselves (and on the query)
    other = x.at[:, 1].set(-x[:, 1])
    assert not np.allclose(np.asarray(model.apply({"params": params}, other))[:, 0],
                           np.asarray(s)[:, 0])


def test_trained_positions_are_not_symmetric():
    """With its initial (random) mixing matrices the matcher is position-aware; order equivariance
    is learned from candidates in random order, not built in."""
    model, params = _init(_matcher_cfg())
    x = jax.random.normal(jax.random.key(3), (1, 9, 16))
    perm = np.array([1, 0, 2, 3, 4, 5, 6, 7])
    xp = x.at[:, 1:].set(x[:, 1 + perm])
    s, sp = (np.asarray(model.apply({"params": params}, v)) for v in (x, xp))
    assert not np.allclose(sp, s[:, perm], atol=1e-4)


def test_match_objective_against_a_hand_computation():
    scores = np.array([[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 3.0, -0.5], [1.0, 1.0, 1.0, 9.0]], np.float32)
    target = np.array([1, 2, 0], np.int32)
    weight = np.array([1.0, 1.0, 0.0], np.float32)  # the last row is filler
    batch = {"embeddings": jnp.zeros((3, 5, 4)), "target": target, "weight": weight}
    loss, sums = objectives.match(lambda p, e: jnp.asarray(scores), None, batch)
    nll = [math.log(sum(math.exp(v) for v in row)) - row[t] for row, t in zip(scores[:2], target)]
    assert float(sums["nll"]) == pytest.approx(sum(nll), rel=1e-6)
    assert float(loss) == pytest.approx(sum(nll) / 2, rel=1e-6)
    assert float(sums["tokens"]) == 2.0
    assert float(sums["correct"]) == 1.0  # row 0 picks 0 (target 1), row 1 picks 2 (target 2)


def test_match_cosine_scores_cosine_over_the_temperature():
    rng = np.random.default_rng(0)
    e = rng.normal(size=(2, 4, 6)).astype(np.float32)
    e[0, 2] = 3.0 * e[0, 0]  # candidate 1 of row 0 is the query, scaled: cosine 1
    batch = {"embeddings": jnp.asarray(e), "target": np.array([1, 0], np.int32),
             "weight": np.ones(2, np.float32)}
    _, sums = objectives.match_cosine(None, None, batch)
    unit = e / np.linalg.norm(e, axis=-1, keepdims=True)
    cos = np.einsum("bd,bkd->bk", unit[:, 0], unit[:, 1:]) / 0.02
    want = [np.log(np.exp(c - c.max()).sum()) + c.max() - c[t] for c, t in zip(cos, [1, 0])]
    assert float(sums["nll"]) == pytest.approx(sum(want), rel=1e-5)
    assert float(sums["correct"]) == float(1 + (np.argmax(cos[1]) == 0))


def test_matcher_config_errors():
    causal = _matcher_cfg()
    causal.model.causal = True
    with pytest.raises(UserError, match="set model.causal=False"):
        build_model(causal.model)
    with pytest.raises(UserError, match="needs model.kind='matcher'"):
        objectives.build("match", objectives.ObjectiveContext(base_config().model, base_config().train))
    model, params = _init(_matcher_cfg())
    with pytest.raises(UserError, match=r"n_ctx=9, d_model=16"):
        model.apply({"params": params}, jnp.zeros((1, 9, 8)))
