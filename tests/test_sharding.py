"""Sharding presets on 8 fake CPU devices: same loss as one device; FSDP shrinks per-device bytes."""
import jax
import numpy as np
import pytest

from mixers_jax import sharding
from mixers_jax import steps as steps_lib
from mixers_jax.config import load_config
from mixers_jax.errors import UserError
from tests_util import config_path


def _config(module="mixer_clm", preset="3d", tensor=1, **model):
    config = load_config(config_path(module, "smoke"))
    config.unlock()
    config.model.update(model)
    config.sharding = preset
    config.mesh.tensor = tensor
    config.lock()
    return config


def _batches(config, n=2):
    out = []
    for s in range(n):
        rng = np.random.default_rng(s)
        rows, n_ctx = config.train.batch_size, config.model.n_ctx
        mask = np.ones((rows, n_ctx), np.float32)
        mask[1, n_ctx // 3:] = 0.0
        out.append({
            "tokens": rng.integers(3, config.model.vocab_size, (rows, n_ctx), dtype=np.int32),
            "loss_mask": mask,
            "token_bytes": np.full((rows, n_ctx), 2, np.int32),
        })
    return out


def _axes(spec):
    out = set()
    for entry in spec:
        out.update((entry,) if isinstance(entry, str) else (entry or ()))
    return out


def _losses(config, mesh, rules, batches):
    steps = steps_lib.build_steps(config, mesh, rules=rules)
    state = steps.init(jax.random.key(0))
    losses = []
    for b in batches:
        state, stats = steps.train_step(state, sharding.global_batch(b, mesh))
        losses.append(float(stats["loss"]))
    return losses, steps


SHAPES = {"dp": (8, 1, 1), "fsdp": (1, 8, 1), "tp": (4, 1, 2), "fsdp_tp": (1, 4, 2)}
MODELS = {"headed_mixer": ("mixer_clm", {"heads": 2})}
_REFERENCE = {}


def _reference(name):
    """One device's losses (the rules do not matter on one device), computed once per model."""
    if name not in _REFERENCE:
        module, model = MODELS[name]
        config = _config(module, "dp", 1, **model)
        one_mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
        _REFERENCE[name] = _losses(config, one_mesh, sharding.DP_RULES, _batches(config))[0]
    return _REFERENCE[name]


@pytest.mark.parametrize(
    "name,preset",
    # The transformer (and the flat mixer) under these rules on 2x2x2: tests/test_trainer.py.
    [("headed_mixer", p) for p in SHAPES],
)
def test_preset_train_step_equals_one_device(name, preset):
    module, model = MODELS[name]
    config = _config(module, preset, 2 if "tp" in preset else 1, **model)
    sizes, rules = sharding.resolve(config)
    mesh = sharding.make_mesh(sizes)
    assert tuple(mesh.shape.values()) == SHAPES[preset]
    ref = _reference(name)
    got, steps = _losses(config, mesh, rules, _batches(config))
    np.testing.assert_allclose(got, ref, rtol=2e-5)
    used = set().union(*(_axes(s.spec) for s in jax.tree.leaves(steps.state_shardings.params)))
    expected = {"dp": set(), "fsdp": {"fsdp"}, "tp": {"tensor"}, "fsdp_tp": {"fsdp", "tensor"}}[preset]
    assert used == expected, (preset, used)


def test_flat_mixer_matrices_stay_whole_and_headed_ones_split_by_head():
    for heads, expect in ((0, ()), (2, ("tensor",))):
        config = _config("mixer_clm", "fsdp_tp", 2, heads=heads)
        sizes, rules = sharding.resolve(config)
        steps = steps_lib.build_steps(config, sharding.make_mesh(sizes), rules=rules)
        flat = jax.tree_util.tree_flatten_with_path(steps.state_shardings.params)[0]
        mixing_w = [s for path, s in flat if getattr(path[-1], "key", None) == "w"]
        assert mixing_w, [p for p, _ in flat]
        assert {tuple(s.spec) for s in mixing_w} == {expect}, heads


def _param_bytes_per_device(config, fsdp):
    sizes = {"data": 8 // fsdp, "fsdp": fsdp, "tensor": 1}
    mesh = sharding.make_mesh(sizes)
    steps = steps_lib.build_steps(config, mesh, rules=sharding.FSDP_RULES)
    state = steps.init(jax.random.key(0))
    per = sharding.bytes_per_device(state.params)
    return max(per.values()), steps


def test_fsdp_shrinks_per_device_parameter_bytes_as_predicted():
    config = _config("mixer_clm", "fsdp", d_model=64)
    base, steps = _param_bytes_per_device(config, 1)
    abstract = steps.abstract_state.params
    for fsdp in (4, 8):
        got, steps = _param_bytes_per_device(config, fsdp)
        # Prediction: every leaf whose spec uses 'fsdp' is split fsdp ways, the rest replicated.
        predicted = 0
        for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(steps.state_shardings.params)):
            nbytes = leaf.size * leaf.dtype.itemsize
            predicted += nbytes // fsdp if "fsdp" in _axes(sh.spec) else nbytes
        assert got == predicted, (fsdp, got, predicted)
        assert got < base
    # With d_model=64 nearly everything but the n x n mixing matrices and norms is split 8 ways.
    assert got < 0.45 * base, (got, base)


def test_bad_preset_and_bad_mesh_are_user_errors():
    config = _config()
    config.unlock()
    config.sharding = "zero3"
    with pytest.raises(UserError, match="unknown sharding preset 'zero3'"):
        sharding.resolve(config)
    with pytest.raises(UserError, match="needs 12 devices, but 8 are available"):
        sharding.make_mesh({"data": 3, "fsdp": 2, "tensor": 2})
    with pytest.raises(UserError, match="DATAxFSDPxTENSOR"):
        sharding.parse_mesh("2x2")
    assert sharding.parse_mesh("4x2x2") == {"data": 4, "fsdp": 2, "tensor": 2}


def test_detect_multiprocess_from_environment():
    assert sharding.detect_multiprocess({}) is None
    assert sharding.detect_multiprocess({"SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}) == "slurm"
    assert sharding.detect_multiprocess({"SLURM_NTASKS": "4"}) is None  # sbatch shell, not srun
    assert sharding.detect_multiprocess({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu"
    assert sharding.detect_multiprocess({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert sharding.detect_multiprocess({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpi"


def test_every_preset_has_a_rule_for_every_logical_axis():
    from mixers_jax.models import layers

    names = set(layers.LOGICAL_AXES) | {"batch", "length", "act_embed", "act_mlp", "act_heads"}
    for name, preset in sharding.PRESETS.items():
        assert names <= {logical for logical, _ in preset["rules"]}, name
