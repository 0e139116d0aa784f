"""Dropout (off = today's forward exactly, on = reproducible from the seed) and float16 training
with dynamic loss scaling (an overflowing step is skipped and counted; a short run trains)."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mixers_jax import curves, sharding, trainer
from mixers_jax import steps as steps_lib
from mixers_jax.config import load_config
from mixers_jax.errors import UserError
from mixers_jax.models import build_model
from tests_util import config_path

DROPOUT = {"dropout_embed": 0.1, "dropout_resid": 0.2, "dropout_attn": 0.1}


def _config(kind, **model):
    config = load_config(config_path(f"{kind}_clm", "smoke"))
    config.unlock()
    config.model.update(model)
    config.lock()
    return config


def _tokens(config, rows=2, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(3, config.model.vocab_size, (rows, config.model.n_ctx)), jnp.int32)


def _batch(config, rows):
    n = config.model.n_ctx
    return {"tokens": np.asarray(_tokens(config, rows)), "loss_mask": np.ones((rows, n), np.float32),
            "token_bytes": np.full((rows, n), 3, np.int32)}


def _mesh():
    return sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, (1, 1, 1)))),
                              jax.devices()[:1])


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
def test_dropout_off_is_the_plain_forward_and_on_is_reproducible(kind):
    plain, dropped = _config(kind), _config(kind, **DROPOUT)
    tokens = _tokens(plain)
    params = build_model(plain.model).init(jax.random.key(0), tokens)["params"]
    params_d = build_model(dropped.model).init(jax.random.key(0), tokens)["params"]
    # same parameter tree and values: dropout adds no parameter and draws nothing at init
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params_d))
    model, model_d = build_model(plain.model), build_model(dropped.model)
    base = model.apply({"params": params}, tokens)
    rng = {"dropout": jax.random.key(7)}
    # rates 0 with a dropout RNG given, and rates > 0 without one (evaluation), are the plain forward
    np.testing.assert_array_equal(base, model.apply({"params": params}, tokens, rngs=rng))
    np.testing.assert_array_equal(base, model_d.apply({"params": params}, tokens))
    on = model_d.apply({"params": params}, tokens, rngs=rng)
    np.testing.assert_array_equal(on, model_d.apply({"params": params}, tokens, rngs=rng))
    other = model_d.apply({"params": params}, tokens, rngs={"dropout": jax.random.key(8)})
    assert not np.array_equal(on, base) and not np.array_equal(on, other)


@pytest.mark.parametrize("field", sorted(DROPOUT))
def test_each_transformer_dropout_changes_the_training_forward(field):
    config = _config("transformer", **{field: 0.5})
    tokens = _tokens(config)
    model = build_model(config.model)
    params = model.init(jax.random.key(0), tokens)["params"]
    on = model.apply({"params": params}, tokens, rngs={"dropout": jax.random.key(1)})
    assert not np.array_equal(on, model.apply({"params": params}, tokens))


def test_dropout_train_step_is_reproducible_from_the_seed_and_off_equals_today():
    mesh, plain = _mesh(), _config("mixer")
    batch = sharding.global_batch(_batch(plain, plain.train.batch_size), mesh)

    def one_step(config):
        steps = steps_lib.build_steps(config, mesh)
        state, stats = steps.train_step(steps.init(jax.random.key(0)), batch)
        return jax.device_get(state.params), float(stats["loss"])

    base = one_step(plain)
    dropped = _config("mixer", dropout_resid=0.3)
    a, b = one_step(dropped), one_step(dropped)
    assert a[1] == b[1] and a[1] != base[1]
    jax.tree.map(np.testing.assert_array_equal, a[0], b[0])
    # eval is deterministic: the eval step of a dropout model equals that of the plain model
    steps_p, steps_d = steps_lib.build_steps(plain, mesh), steps_lib.build_steps(dropped, mesh)
    params = steps_p.init(jax.random.key(0)).params
    assert float(steps_p.eval_step(params, batch)["nll"]) == float(steps_d.eval_step(params, batch)["nll"])


def test_bad_dropout_rate_is_a_user_error():
    with pytest.raises(UserError, match="model.dropout_resid"):
        build_model(_config("mixer", dropout_resid=1.0).model)


def _with_scale(state, value):
    """``state`` with the loss scale set to ``value`` (float32), placed like the scale it replaces:
    the compiled train step takes it as it is, without compiling again for a new placement."""
    scale = jax.device_put(jnp.asarray(value, jnp.float32), state.opt_state.scale.sharding)
    return state.replace(opt_state=state.opt_state._replace(scale=scale))


@pytest.mark.parametrize("kind", ["mixer", "transformer"])
def test_fp16_step_skips_an_injected_overflow_and_continues(kind):
    mesh, config = _mesh(), _config(kind, dtype="float16")
    steps = steps_lib.build_steps(config, mesh)
    batch = sharding.global_batch(_batch(config, config.train.batch_size), mesh)
    state = steps.init(jax.random.key(0))
    assert float(state.opt_state.scale) == steps_lib.LOSS_SCALE_INIT
    state, stats = steps.train_step(state, batch)  # a normal step (lr 0 at step 0)
    assert not bool(stats["skipped"]) and int(stats["skipped_steps"]) == 0
    before = jax.device_get(state)
    # inject an overflow: a loss scale so large that S·loss is inf in float32
    state = _with_scale(state, 3e38)
    state, stats = steps.train_step(state, batch)
    after = jax.device_get(state)
    assert bool(stats["skipped"]) and int(stats["skipped_steps"]) == 1
    assert bool(stats["finite"]) and np.isfinite(float(stats["loss"]))
    assert float(stats["loss_scale"]) == pytest.approx(1.5e38)
    jax.tree.map(np.testing.assert_array_equal, before.params, after.params)
    jax.tree.map(np.testing.assert_array_equal, before.opt_state.inner.inner_state,
                 after.opt_state.inner.inner_state)
    assert "finite" not in trainer._non_finite(jax.device_get(stats))  # not divergence
    state = _with_scale(state, 2.0 ** 10)
    for _ in range(2):
        state, stats = steps.train_step(state, batch)
        assert not bool(stats["skipped"]) and int(stats["skipped_steps"]) == 1
    changed = jax.device_get(state.params)
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before.params), jax.tree.leaves(changed)))
    assert int(stats["consecutive_skips"]) == 0


def test_consecutive_skips_under_loss_scaling_are_divergence():
    stats = {"loss": float("inf"), "grad_norm": float("nan"), "finite": True, "skipped": True,
             "consecutive_skips": 3}
    assert trainer._non_finite(stats) == ""
    stats["consecutive_skips"] = steps_lib.MAX_CONSECUTIVE_SKIPS
    assert "consecutive steps skipped" in trainer._non_finite(stats)


def test_loss_scale_halves_on_overflow_and_doubles_after_the_growth_interval():
    tx = steps_lib.dynamic_loss_scale(optax.sgd(0.1))
    params = {"w": jnp.ones(3)}
    state = tx.init(params)
    _, state = tx.update({"w": jnp.array([1.0, jnp.inf, 0.0])}, state, params)
    assert float(state.scale) == steps_lib.LOSS_SCALE_INIT / 2
    state = state._replace(good_steps=jnp.int32(steps_lib.LOSS_SCALE_GROWTH_STEPS - 1))
    updates, state = tx.update({"w": jnp.full(3, steps_lib.LOSS_SCALE_INIT / 2)}, state, params)
    assert float(state.scale) == steps_lib.LOSS_SCALE_INIT and int(state.good_steps) == 0
    np.testing.assert_allclose(updates["w"], -0.1 * np.ones(3))  # the unscaled gradient, lr 0.1


def test_fp16_smoke_run_trains_and_logs_the_scale(tmp_path):
    config = _config("mixer", dtype="float16")
    workdir = str(tmp_path / "run")
    summary = trainer.run(config, workdir)
    assert summary["final_step"] == config.train.steps
    scalars = curves.read_scalars(os.path.join(workdir, "tb"))
    losses = [v for _, v in scalars["train/loss"]]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    scales = [v for _, v in scalars["train/loss_scale"]]
    skipped = [v for _, v in scalars["train/skipped_steps"]]
    assert len(scales) == len(losses) and all(1.0 <= s <= steps_lib.LOSS_SCALE_INIT for s in scales)
    assert skipped == sorted(skipped) and skipped[-1] < config.train.steps
    assert np.isfinite(summary["eval"]["loss"])


def test_fp16_run_resumes_with_its_loss_scale_exactly(tmp_path):
    config = _config("mixer", dtype="float16", dropout_resid=0.1)
    full = trainer.run(config, str(tmp_path / "full"))
    trainer.run(config, str(tmp_path / "part"), stop_at_step=3)
    resumed = trainer.run(config, str(tmp_path / "part"))
    assert resumed["start_step"] == 3
    jax.tree.map(np.testing.assert_array_equal, full["params"], resumed["params"])


def test_fp16_with_gradient_accumulation_reports_the_unscaled_gradient():
    """Accumulated S·loss gradients are unscaled: the fp16 step's gradient norm is the float32
    step's (to fp16 accuracy), not S times it, and the update is applied."""
    mesh = _mesh()

    def first_steps(dtype):
        config = _config("mixer", dtype=dtype)
        config.unlock()
        config.train.grad_accum = 2
        config.lock()
        steps = steps_lib.build_steps(config, mesh)
        batch = sharding.global_batch(_batch(config, config.train.batch_size), mesh)
        state = steps.init(jax.random.key(0))
        before = jax.device_get(state.params)
        norms = []
        for _ in range(2):  # step 0 has lr 0
            state, stats = steps.train_step(state, batch)
            norms.append(float(stats["grad_norm"]))
        moved = any(not np.array_equal(a, b) for a, b in
                    zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(state.params))))
        return norms, stats, moved

    norms16, stats, moved = first_steps("float16")
    norms32, _, _ = first_steps("float32")
    assert not bool(stats["skipped"]) and moved
    np.testing.assert_allclose(norms16[0], norms32[0], rtol=0.05)
