"""Curricula, frozen parameter groups and init_from (curriculum.stages / param_labels / init_from)."""
import jax
import numpy as np
import pytest

from mixers_jax import curriculum, trainer
from mixers_jax import steps as steps_lib
from mixers_jax.config import load_config
from mixers_jax.errors import UserError
from tests_util import config_path


def _config(**train):
    config = load_config(config_path("mixer_clm", "smoke"))
    config.unlock()
    config.train.update(train)
    config.lock()
    return config


def _init_params(config):
    """The parameters a fresh run of ``config`` starts from (same seed as trainer.run)."""
    from mixers_jax import sharding

    mesh = sharding.make_mesh(sharding.resolve(config)[0])
    steps = steps_lib.build_steps(config, mesh)
    return jax.device_get(steps.init(jax.random.key(int(config.seed))).params)


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_frozen_group_is_bit_identical_after_training_and_the_rest_moves(tmp_path):
    config = _config(frozen="block_0")
    before = _init_params(config)
    after = trainer.run(config, str(tmp_path / "run"))["params"]
    assert _equal(before["block_0"], after["block_0"])
    assert not _equal(before["block_1"], after["block_1"])
    assert not _equal(before["head"], after["head"])


def test_stages_split_steps_and_restart_the_schedule():
    config = _config(stages=({"objective": "clm", "steps": 4, "lr": 1e-3},
                             {"name": "frozen", "steps": 2, "frozen": "embed", "warmup_steps": 1}))
    st = curriculum.stages(config)
    assert [(s.start, s.end, s.name) for s in st] == [(0, 4, "clm"), (4, 6, "frozen")]
    assert curriculum.stage_at(st, 4).index == 0 and curriculum.stage_at(st, 5).index == 1
    sched = steps_lib.lr_schedule(st[1].train, offset=st[1].start)
    assert float(sched(4)) == 0.0  # a stage's first update has lr 0, like a run's
    assert float(sched(5)) == pytest.approx(float(config.train.lr))
    with pytest.raises(UserError, match="unknown key"):
        curriculum.stages(_config(stages=({"steps": 2, "lr_peak": 1.0},)))


def test_a_later_stage_descends_from_its_own_warmup():
    """The optimizer a later stage trains with (build_steps at the stage's offset, a fresh state at
    its first global step) applies the stage's own schedule: lr 0 on its first update, then at most
    lr(1) = η/w per parameter (Adam's first steps), downhill. The stage offset must not reach the
    optimizer's own step count, which restarts at 0 with the fresh state."""
    from mixers_jax import sharding

    config = _config(stages=({"objective": "clm", "steps": 20},
                             {"name": "second", "steps": 4, "frozen": "block_0", "lr": 1e-3,
                              "warmup_steps": 2}))
    second = curriculum.stages(config)[1]
    mesh = sharding.make_mesh(sharding.resolve(config)[0])
    steps = steps_lib.build_steps(curriculum.stage_config(config, second), mesh,
                                  offset=second.start)
    params = jax.device_get(steps.init(jax.random.key(0)).params)
    state = steps.fresh_state(params, jax.numpy.asarray(second.start, jax.numpy.int32))
    rng = np.random.default_rng(0)
    n = int(config.model.n_ctx)
    batch = {"tokens": rng.integers(3, int(config.model.vocab_size), (8, n)).astype(np.int32),
             "loss_mask": np.ones((8, n), np.float32), "token_bytes": np.ones((8, n), np.int32)}
    losses, moved = [], []
    for _ in range(3):
        before = jax.device_get(state.params)
        state, stats = steps.train_step(state, batch)
        losses.append(float(stats["loss"]))
        moved.append(max(float(np.max(np.abs(a - b))) for a, b in zip(
            jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(before))))
    assert moved[0] == 0.0  # lr 0 on the stage's first update
    lr1 = float(steps_lib.lr_schedule(second.train, offset=second.start)(second.start + 1))
    assert lr1 == pytest.approx(5e-4)
    assert 0.1 * lr1 < moved[1] <= lr1 * 1.001  # Adam's update is at most lr per parameter
    assert losses[2] < losses[1]  # downhill on the repeated batch


def _curriculum_config():
    stages = ({"objective": "clm", "steps": 3},
              {"name": "head_only", "objective": "clm", "steps": 3, "frozen": "embed,block_0,block_1",
               "lr": 3e-3, "warmup_steps": 1})
    return _config(stages=stages, eval_every=100, checkpoint_every=100)


@pytest.fixture(scope="module")
def uninterrupted_curriculum(tmp_path_factory):
    """One uninterrupted run of the two-stage curriculum, shared by the kill / resume cases."""
    full = trainer.run(_curriculum_config(), str(tmp_path_factory.mktemp("curriculum") / "full"),
                       record_batches=True)
    assert full["final_step"] == 6
    return full


@pytest.mark.parametrize("kill_at", [3, 4])  # at the stage boundary, and mid-stage
def test_curriculum_killed_then_resumed_equals_uninterrupted(tmp_path, kill_at,
                                                             uninterrupted_curriculum):
    config = _curriculum_config()
    full = uninterrupted_curriculum
    part = str(tmp_path / "part")
    first = trainer.run(config, part, stop_at_step=kill_at, record_batches=True)
    second = trainer.run(config, part, record_batches=True)
    assert second["start_step"] == kill_at
    assert first["batch_digests"] + second["batch_digests"] == full["batch_digests"]
    jax.tree.map(np.testing.assert_array_equal, full["params"], second["params"])
    assert full["eval"] == second["eval"]


def test_init_from_copies_mapped_groups_and_checks_shapes(tmp_path):
    source_dir = str(tmp_path / "source")
    source = trainer.run(_config(), source_dir)["params"]
    config = _config(init_from=source_dir, init_map="block_0=block_0,block_1=block_1",
                     frozen="block_0,block_1")
    after = trainer.run(config, str(tmp_path / "target"))["params"]
    assert _equal(source["block_0"], after["block_0"]) and _equal(source["block_1"], after["block_1"])
    assert not _equal(source["head"], after["head"])  # trained from its own fresh init

    wider = load_config(config_path("mixer_clm", "smoke"))
    wider.unlock()
    wider.model.d_model = 48
    wider.train.init_from, wider.train.init_map = source_dir, "block_0=block_0"
    target = tmp_path / "wider"
    with pytest.raises(UserError, match=r"block_0/.* has shape .* here but .* there"):
        trainer.run(wider, str(target))
    assert not target.exists()  # nothing written for bad input
    with pytest.raises(UserError, match="does not have"):
        trainer.run(_config(frozen="encoder"), str(tmp_path / "nogroup"))


# The cpu_curriculum preset (configs/memory.py) end to end at smoke size: the autoencoder of
# autoencoder.py:cpu_memory_encoder, then both stages of the curriculum reading its encoder frozen.
_SMOKE_SIZE = {"model.vocab_size": 320, "model.heads": 2, "model.n_heads": 2,
               "train.batch_size": 8, "train.log_every": 2, "train.eval_batches": 2,
               "data.max_documents": 300, "data.tokenizer_max_chars": 300_000}


def _preset(name, preset, fields):
    config = load_config(config_path(name, preset))
    config.unlock()
    for key, value in {**_SMOKE_SIZE, **fields}.items():
        section, _, leaf = key.rpartition(".")
        node = config
        for part in section.split("."):
            node = node[part]
        node[leaf] = value
    config.lock()
    return config


def test_cpu_curriculum_preset_end_to_end_at_smoke_size(tmp_path):
    ae_dir, mem_dir = str(tmp_path / "ae16"), str(tmp_path / "curriculum")
    ae = trainer.run(_preset("autoencoder", "cpu_memory_encoder", {
        "model.d_model": 16, "model.n_layers": 1, "train.steps": 2, "train.warmup_steps": 1,
        "train.eval_every": 2, "train.checkpoint_every": 2}), ae_dir)
    config = _preset("memory", "cpu_curriculum", {
        "model.d_model": 32, "model.n_layers": 1, "model.encoder.d_model": 16,
        "model.encoder.n_layers": 1, "train.init_from": ae_dir, "train.warmup_steps": 1,
        "train.eval_every": 4, "train.checkpoint_every": 4,
        "train.eval_objectives": ("clm", "blank_copy")})  # fewer eval compiles than the preset's 5
    preset_stages = curriculum.stages(load_config(config_path("memory", "cpu_curriculum")))
    assert [(s.name, str(s.train.objective), str(s.train.frozen)) for s in preset_stages] == [
        ("blank_copy", "blank_copy", "encoder"), ("combined", "combined", "encoder")]
    config.unlock()
    config.train.stages = tuple(dict(s, steps=2) for s in config.train.stages)
    config.lock()
    out = trainer.run(config, mem_dir)
    assert out["final_step"] == 4 and not out["preempted"]
    assert set(out["evals"]) == {"clm", "blank_copy"}
    enc_ae, enc_mem = ae["params"]["encoder"], out["params"]["encoder"]
    assert config.model.scan_layers and "blocks" in enc_mem and "block_0" in enc_ae
    loaded = curriculum.in_block_layout(enc_mem, enc_ae)  # the unscanned AE's blocks, stacked
    assert _equal(loaded["blocks"], enc_mem["blocks"])  # frozen in both stages
    assert [line for line in open(f"{mem_dir}/log.txt") if "stage 2/2 'combined'" in line]


def test_blocks_load_between_the_scanned_and_unscanned_layouts():
    """init_from between model.scan_layers=True and False: block_i/... <-> blocks/...[i]."""
    rng = np.random.default_rng(0)
    unscanned = {"embed": {"embedding": rng.standard_normal((5, 3))},
                 **{f"block_{i}": {"mix": {"w": rng.standard_normal((4, 4))},
                                   "ffn": {"b": rng.standard_normal(3)}} for i in range(3)}}
    scanned = {"embed": {"embedding": np.zeros((5, 3))},
               "blocks": {"mix": {"w": np.zeros((3, 4, 4))}, "ffn": {"b": np.zeros((3, 3))}}}
    stacked = curriculum.in_block_layout(scanned, unscanned)
    assert set(stacked) == {"embed", "blocks"}
    for i in range(3):
        np.testing.assert_array_equal(stacked["blocks"]["mix"]["w"][i], unscanned[f"block_{i}"]["mix"]["w"])
        np.testing.assert_array_equal(stacked["blocks"]["ffn"]["b"][i], unscanned[f"block_{i}"]["ffn"]["b"])
    back = curriculum.in_block_layout(unscanned, stacked)
    assert set(back) == set(unscanned) and _equal(back, unscanned)
    assert curriculum.in_block_layout(unscanned, unscanned) is unscanned  # same layout: unchanged
    shapes = curriculum.in_block_layout(
        scanned, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), unscanned))
    assert shapes["blocks"]["mix"]["w"].shape == (3, 4, 4)  # the shape-only check before loading
