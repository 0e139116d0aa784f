"""Trainer: sharded == single device, exact resume, accumulation, schedule, non-finite stop."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mixers_jax import objectives, sharding, trainer
from mixers_jax import workdir as workdir_lib
from mixers_jax import steps as steps_lib
from mixers_jax.errors import UserError
from mixers_jax.config import load_config
from tests_util import config_path


def _tiny(name, **model):
    config = load_config(config_path(name, "smoke"))
    config.unlock()
    config.model.update(model)
    config.lock()
    return config


def _batch(config, rows, seed=0):
    rng = np.random.default_rng(seed)
    n = config.model.n_ctx
    tokens = rng.integers(3, config.model.vocab_size, size=(rows, n), dtype=np.int32)
    mask = np.ones((rows, n), np.float32)
    mask[0, n // 2 :] = 0.0  # some ignored targets, as pads would be
    return {"tokens": tokens, "loss_mask": mask, "token_bytes": np.full((rows, n), 3, np.int32)}


def _mesh(shape, devices):
    return sharding.make_mesh(ml_collections.ConfigDict(dict(zip(sharding.MESH_AXES, shape))), devices)


def _train(config, mesh, batches):
    steps = steps_lib.build_steps(config, mesh)
    state = steps.init(jax.random.key(0))
    losses = []
    for b in batches:
        state, stats = steps.train_step(state, sharding.global_batch(b, mesh))
        losses.append(float(stats["loss"]))
    return jax.device_get(state.params), losses


@pytest.mark.parametrize(
    "module,model",
    [
        ("mixer_clm", {}),
        ("mixer_clm", {"heads": 2}),
        ("transformer_clm", {}),
    ],
    ids=["flat_mixer", "headed_mixer", "transformer"],
)
def test_train_step_on_2x2x2_mesh_equals_one_device(module, model):
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    config = _tiny(module, **model)
    batches = [_batch(config, config.train.batch_size, seed=s) for s in range(2)]
    one_params, one_losses = _train(config, _mesh((1, 1, 1), jax.devices()[:1]), batches)
    mesh = _mesh((2, 2, 2), jax.devices())
    many_params, many_losses = _train(config, mesh, batches)
    np.testing.assert_allclose(one_losses, many_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6), one_params, many_params)
    # The 2x2x2 run really is sharded: FSDP splits the embedding over 'fsdp' (and vocab over 'tensor').
    steps = steps_lib.build_steps(config, mesh)
    emb_spec = [s.spec for s in jax.tree.leaves(steps.state_shardings.params)]
    assert any("fsdp" in str(spec) for spec in emb_spec)


def test_gradient_accumulation_matches_one_big_batch():
    config = _tiny("mixer_clm")
    batch = _batch(config, 8)
    batch["loss_mask"][:] = 1.0  # equal token counts: mean of micro-batch means == global mean
    mesh = _mesh((1, 1, 1), jax.devices()[:1])
    p1, l1 = _train(config, mesh, [batch])
    config.unlock()
    config.train.grad_accum = 2
    p2, l2 = _train(config, mesh, [batch])
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p2)


def test_lr_schedule_matches_reference_formula():
    t = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, steps=110, schedule="linear"))
    lr = steps_lib.lr_schedule(t)
    assert float(lr(0)) == 0.0  # docs/training.md#learning-rate-schedule: the first update uses lr 0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 1e-3 * 50 / 100, rtol=1e-6)
    assert float(lr(110)) == 0.0
    t.schedule = "cosine"
    np.testing.assert_allclose(float(steps_lib.lr_schedule(t)(60)), 5e-4, rtol=1e-5)


def test_resume_equals_uninterrupted_bit_exact(tmp_path):
    config = load_config(config_path("mixer_clm", "smoke"))
    full = trainer.run(config, str(tmp_path / "full"), record_batches=True)
    first = trainer.run(config, str(tmp_path / "split"), stop_at_step=3, record_batches=True)
    assert first["preempted"] and first["final_step"] == 3
    second = trainer.run(config, str(tmp_path / "split"), record_batches=True)
    assert second["start_step"] == 3
    assert first["batch_digests"] + second["batch_digests"] == full["batch_digests"]
    jax.tree.map(np.testing.assert_array_equal, full["params"], second["params"])
    assert full["eval"] == second["eval"]


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    config = load_config(config_path("mixer_clm", "smoke"))
    workdir = str(tmp_path / "run")
    trainer.run(config, workdir, stop_at_step=3)

    def poisoned(apply_fn, params, batch):
        loss, sums = objectives.clm(apply_fn, params, batch)
        return loss * jnp.nan, sums

    monkeypatch.setitem(objectives.OBJECTIVES, "clm", lambda ctx: poisoned)
    with pytest.raises(UserError, match=r"non-finite loss .* at step 4.*step 3"):
        trainer.run(config, workdir)
    from mixers_jax.checkpoint import Checkpointer

    assert Checkpointer(f"{workdir}/checkpoints").all_steps() == [3]


def test_workdir_from_before_a_new_model_field_still_resumes(tmp_path):
    import json

    config = load_config(config_path("mixer_clm", "smoke"))
    saved = config.to_dict()
    del saved["model"]["mixing_impl"]  # as if written before the field existed (default 'dense')
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert workdir_lib.check_workdir_compatible(config, str(tmp_path))
    config.unlock()
    config.model.mixing_impl = "fft"
    config.model.mixing = "toeplitz"
    with pytest.raises(UserError, match="holds a different model"):
        workdir_lib.check_workdir_compatible(config, str(tmp_path))


def test_eval_objectives_accept_a_comma_list_from_the_command_line():
    """``--config.train.eval_objectives=blank_copy,clm`` reaches the tuple field as ('blank_copy,clm',)."""
    from mixers_jax.config import base_config
    from mixers_jax.curriculum import eval_objective_names

    train = base_config().train
    train.objective = "combined"
    assert eval_objective_names(train) == ("combined",)
    train.eval_objectives = ("blank_copy,clm",)
    assert eval_objective_names(train) == ("blank_copy", "clm")
    train.eval_objectives = ("clm", " copy ")
    assert eval_objective_names(train) == ("clm", "copy")


def test_activation_dims_of_composite_models_divide_every_part():
    """A mesh axis may split an activation axis only if it divides it in the encoder and decoder."""
    from mixers_jax.config import base_config

    m = base_config().model
    m.update({"kind": "memory", "d_model": 256, "mlp_ratio": 4, "heads": 4})
    m.encoder.update({"d_model": 96, "heads": 6})
    assert steps_lib.activation_dims(m) == {"act_heads": 2, "act_mlp": 128}
    m.encoder.update({"kind": "transformer"})
    m.update({"n_heads": 8})
    assert steps_lib.activation_dims(m) == {"act_heads": 4, "act_mlp": 128}
    m = base_config().model
    m.update({"kind": "mixer", "d_model": 64, "mlp_ratio": 4, "heads": 0})
    assert steps_lib.activation_dims(m) == {"act_heads": 1, "act_mlp": 256}


@pytest.mark.parametrize("key,value", [
    ("eval_every", 0), ("log_every", 0), ("checkpoint_every", -1), ("lr", -1e-3), ("lr", 0.0),
    ("keep_checkpoints", 0), ("warmup_steps", -1), ("batch_size", 0),
])
def test_bad_train_setting_is_refused_before_anything_is_written(tmp_path, key, value):
    config = load_config(config_path("mixer_clm", "smoke"))
    config.unlock()
    config.train[key] = value
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=rf"^train\.{key} must be"):
        trainer.run(config, str(workdir))
    assert not workdir.exists()


def test_workdir_that_is_a_file_is_refused_before_anything_is_written(tmp_path):
    config = load_config(config_path("mixer_clm", "smoke"))
    workdir = tmp_path / "run"
    workdir.write_text("not a folder")
    with pytest.raises(UserError, match=rf"^workdir {workdir} is a file, not a folder$"):
        trainer.run(config, str(workdir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert workdir.read_text() == "not a folder"


def test_init_from_a_workdir_without_checkpoints_is_refused_before_anything_is_written(tmp_path):
    import shutil

    source = tmp_path / "source"
    trainer.run(load_config(config_path("mixer_clm", "smoke")), str(source), stop_at_step=1)
    for step in (source / workdir_lib.CHECKPOINTS_DIR).iterdir():
        shutil.rmtree(step)
    config = load_config(config_path("mixer_clm", "smoke"))
    config.unlock()
    config.train.init_from, config.train.init_map = str(source), "block_0=block_0"
    target = tmp_path / "target"
    with pytest.raises(UserError, match=r"init_from .*source has no checkpoint yet"):
        trainer.run(config, str(target))
    assert not target.exists()
