"""Trainer: sharded == single device, exact resume, accumulation, schedule, and the reliability of a
run: divergence, damaged checkpoints, the tokenizer / config / data settings on resume, full disk,
read-only workdir."""
import errno
import json
import os
import re
import shutil
import sys

import jax
import ml_collections
import numpy as np
import pytest

from mixers_jax import metrics as metrics_lib
from mixers_jax import sharding, trainer
from mixers_jax import workdir as workdir_lib
from mixers_jax import steps as steps_lib
from mixers_jax.errors import UserError
from mixers_jax.config import load_config
from mixers_jax import train as train_cli
from mixers_jax.checkpoint import Checkpointer
from mixers_jax.data.tokenizer import Tokenizer
from tests_util import CORRUPTIONS, config_path, exit_status, snapshot

SMOKE = config_path("mixer_clm", "smoke")


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


def test_init_from_a_workdir_without_checkpoints_is_refused_before_anything_is_written(smoke_runs,
                                                                                      tmp_path):
    source = tmp_path / "source"
    shutil.copytree(smoke_runs[2], source)
    for step in (source / workdir_lib.CHECKPOINTS_DIR).iterdir():
        shutil.rmtree(step)
    config = load_config(config_path("mixer_clm", "smoke"))
    config.unlock()
    config.train.init_from, config.train.init_map = str(source), "block_0=block_0"
    target = tmp_path / "target"
    with pytest.raises(UserError, match=r"init_from .*source has no checkpoint yet"):
        trainer.run(config, str(target))
    assert not target.exists()


# --------------------------------------------------------------------------- reliability


def _smoke(**train):
    config = load_config(SMOKE)
    config.unlock()
    config.train.update(train)
    config.lock()
    return config


def _train_cli(monkeypatch, *args) -> int:
    """The exit status of ``python -m mixers_jax.train`` on the smoke preset, run in this process
    (the config flag reads its overrides from sys.argv)."""
    argv = ["train", f"--config={SMOKE}", *args]
    monkeypatch.setattr(sys, "argv", argv)
    for name in list(train_cli.FLAGS):  # a previous call's override flags would be defined twice
        if name.startswith("config."):
            delattr(train_cli.FLAGS, name)
    return exit_status(train_cli, argv)


def _one_error_line(capsys, pattern):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    match = re.search(pattern, lines[0])
    assert match, lines[0]
    return match


def test_divergence_names_the_step_and_a_really_good_checkpoint(tmp_path, capsys, monkeypatch):
    """lr=1e6: the state goes non-finite after an update whose loss was still finite; the run stops
    there (exit 1, one line), records it, and the named checkpoint is finite."""
    workdir = str(tmp_path / "run")
    status = _train_cli(monkeypatch, f"--workdir={workdir}", "--config.train.lr=1e6",
                        "--config.train.checkpoint_every=1")
    assert status == 1
    match = _one_error_line(
        capsys, rf"^error: training diverged at step (\d+) \((non-finite [^)]*)\); "
                rf"last good checkpoint: step (\d+) in {re.escape(workdir)}/checkpoints$")
    bad, good = int(match.group(1)), int(match.group(3))
    assert good == bad - 1
    assert Checkpointer(f"{workdir}/checkpoints", read_only=True).all_steps()[-1] == good
    run = workdir_lib.load_run(workdir, good)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.params))
    results = json.loads(open(f"{workdir}/results.json").read())
    assert results["diverged"]["step"] == bad and results["diverged"]["last_good_step"] == good
    assert results["diverged"]["recorded"] is False  # train.on_divergence='fail' is the default
    assert "eval" not in results
    assert match.group(0)[len("error: "):] in open(f"{workdir}/log.txt").read()


def test_recorded_divergence_is_the_result_and_exits_0(tmp_path, capsys, monkeypatch):
    """train.on_divergence=record: the same divergence as above ends the command with status 0,
    "done: diverged at step N" on stdout, the divergence step in the results table and in
    results.json; the last good checkpoint named is still the finite one before it."""
    workdir = str(tmp_path / "run")
    status = _train_cli(monkeypatch, f"--workdir={workdir}", "--config.train.lr=1e6",
                        "--config.train.checkpoint_every=1", "--config.train.on_divergence=record")
    out = capsys.readouterr()
    assert status == 0, out.err
    assert "error:" not in out.err
    match = re.search(r"^done: diverged at step (\d+) \(non-finite [^;]*; train.on_divergence=record\); "
                      r"last good checkpoint: step (\d+); workdir ", out.out, re.M)
    assert match, out.out
    bad, good = int(match.group(1)), int(match.group(2))
    assert good == bad - 1
    assert Checkpointer(f"{workdir}/checkpoints", read_only=True).all_steps()[-1] == good
    run = workdir_lib.load_run(workdir, good)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(run.params))
    results = json.loads(open(f"{workdir}/results.json").read())
    assert results["diverged"]["step"] == bad and results["diverged"]["recorded"] is True
    assert "eval" not in results
    assert metrics_lib.outcome(results) == f"diverged at step {bad}"
    assert re.search(rf"^clm\s+diverged at step {bad} \(non-finite", open(f"{workdir}/log.txt").read(),
                     re.M)


def test_on_divergence_must_be_fail_or_record(tmp_path, capsys, monkeypatch):
    workdir = tmp_path / "run"
    assert _train_cli(monkeypatch, f"--workdir={workdir}", "--config.train.on_divergence=skip") == 2
    _one_error_line(capsys, r"train.on_divergence must be one of \('fail', 'record'\), got 'skip'")
    assert not workdir.exists()


def test_non_finite_evaluation_stops_the_run(tmp_path, monkeypatch):
    def nan_eval(steps, params, eval_batches):
        return {"clm": {"loss": float("nan"), "accuracy": 0.0, "bpb": float("nan")}}

    from mixers_jax.data.embedded import embedded_corpus

    data = tmp_path / "data"  # the smoke corpus as files, one with 3 bytes of invalid UTF-8
    data.mkdir()
    for i, doc in enumerate(embedded_corpus()[:300]):
        (data / f"{i:03d}.txt").write_bytes(doc.encode() + (b" \xff\xfe\xff" if i == 7 else b""))
    config = _smoke(checkpoint_every=1)
    config.unlock()
    config.data.source = str(data)
    monkeypatch.setattr(trainer, "evaluate_all", nan_eval)
    workdir = str(tmp_path / "run")
    summary = trainer.run(config, workdir)
    assert summary["diverged"]["step"] == 3  # the first evaluation (eval_every=3), before its save
    assert summary["diverged"]["what"] == "non-finite evaluation loss nan (clm)"
    assert summary["diverged"]["last_good_step"] == 2
    assert Checkpointer(f"{workdir}/checkpoints", read_only=True).all_steps() == [1, 2]
    # The source statistics reach results.json and the log.
    results = json.loads(open(f"{workdir}/results.json").read())
    assert results["data"]["replaced_bytes"] == 3 and results["data"]["source_files"] == 300
    assert "data: 3 bytes of invalid UTF-8 in 300 file(s) were read as U+FFFD" in open(
        f"{workdir}/log.txt").read()


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """An uninterrupted smoke run (checkpoint every step) and one stopped at step 4."""
    root = tmp_path_factory.mktemp("runs")
    config = _smoke(checkpoint_every=1)
    full = trainer.run(config, str(root / "full"), record_batches=True)
    stopped = str(root / "stopped")
    first = trainer.run(config, stopped, stop_at_step=4, record_batches=True)
    assert first["preempted"] and first["final_step"] == 4
    full["first_digests"] = first["batch_digests"]
    return config, full, stopped


def _copy(stopped, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(stopped, workdir)
    return workdir


def test_resume_equals_uninterrupted_bit_exact(smoke_runs, tmp_path):
    config, full, stopped = smoke_runs
    second = trainer.run(config, _copy(stopped, tmp_path), record_batches=True)
    assert second["start_step"] == 4
    assert full["first_digests"] + second["batch_digests"] == full["batch_digests"]
    jax.tree.map(np.testing.assert_array_equal, full["params"], second["params"])
    assert full["eval"] == second["eval"]


@pytest.mark.parametrize("kind", [k for k in CORRUPTIONS if k != "flipped byte"])
def test_resume_after_a_damaged_latest_checkpoint_gives_the_same_result(smoke_runs, tmp_path, kind,
                                                                        capsys):
    config, full, stopped = smoke_runs
    workdir = _copy(stopped, tmp_path)
    corrupt, problem = CORRUPTIONS[kind]
    corrupt(os.path.join(workdir, "checkpoints", "4"))
    capsys.readouterr()
    resumed = trainer.run(config, workdir)
    assert resumed["start_step"] == 3
    out = capsys.readouterr().out
    assert re.search(rf"checkpoint 4 is damaged \(.*{re.escape(problem)}.*\); moved to 4\.damaged; "
                     r"resuming from 3", out), out
    jax.tree.map(np.testing.assert_array_equal, full["params"], resumed["params"])
    assert full["eval"] == resumed["eval"]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.damaged"))


def test_resume_accepts_train_changes_records_them_and_refuses_data_and_seed(smoke_runs, tmp_path):
    config, _, stopped = smoke_runs
    workdir = _copy(stopped, tmp_path)
    for key, value in (("data.max_documents", 200), ("data.packing", "pad"), ("seed", 7),
                       ("train.batch_size", 16), ("train.frozen", "embed")):
        changed = load_config(SMOKE)
        changed.unlock()
        section, _, name = key.rpartition(".")
        (changed[section] if section else changed)[name] = value
        before = snapshot(workdir)
        with pytest.raises(UserError, match=rf"other settings \({re.escape(key)}=.*\(saved\) vs "
                                            rf"{value!r}\); data\.\*, seed, .* cannot change on resume"):
            trainer.run(changed, workdir)
        assert snapshot(workdir) == before
    shorter = _smoke(checkpoint_every=1, steps=3)  # the workdir holds step 4
    before = snapshot(workdir)
    with pytest.raises(UserError, match=r"checkpoint at step 4, beyond this run's 3 steps"):
        trainer.run(shorter, workdir)
    assert snapshot(workdir) == before
    longer = _smoke(checkpoint_every=1, steps=5)
    summary = trainer.run(longer, workdir)
    assert summary["final_step"] == 5
    assert workdir_lib.load_config(workdir).train.steps == 5  # config.json: the config in use
    history = [json.loads(ln) for ln in open(os.path.join(workdir, workdir_lib.HISTORY_FILE))]
    assert [h["start_step"] for h in history] == [0, 4]
    assert history[0]["changed"] == {} and history[1]["changed"] == {"train.steps": [6, 5]}
    assert history[1]["pid"] == os.getpid()
    assert "resuming with changed settings: train.steps 6 -> 5" in open(
        os.path.join(workdir, workdir_lib.LOG_FILE)).read()


def test_resume_checks_the_tokenizer_and_restores_a_deleted_one(smoke_runs, tmp_path):
    config, _, stopped = smoke_runs
    workdir = _copy(stopped, tmp_path)
    tok_file = os.path.join(workdir, workdir_lib.TOKENIZER_FILE)
    original = open(tok_file, "rb").read()
    other = Tokenizer.train(["a completely different text to learn pieces from"] * 50, 320)
    other.save(tok_file)
    before = snapshot(workdir)
    with pytest.raises(UserError, match=rf"tokenizer {re.escape(tok_file)} .* is not the one checkpoint 4 "
                                        r"in .* was trained with"):
        trainer.run(config, workdir)
    assert snapshot(workdir) == before
    os.remove(tok_file)
    summary = trainer.run(config, workdir, stop_at_step=5)
    assert summary["start_step"] == 4 and summary["final_step"] == 5
    assert open(tok_file, "rb").read() == original
    assert "was missing: restored it from the latest checkpoint" in open(
        os.path.join(workdir, workdir_lib.LOG_FILE)).read()


def test_load_run_builds_no_optimizer(smoke_runs, monkeypatch):
    import optax

    def no_optimizer(*args, **kwargs):
        raise AssertionError("load_run built an optimizer")

    monkeypatch.setattr(optax, "adamw", no_optimizer)
    _, full, _ = smoke_runs
    before = snapshot(full["workdir"])
    run = workdir_lib.load_run(full["workdir"])
    assert run.step == 6
    assert snapshot(full["workdir"]) == before  # a reader writes nothing
    jax.tree.map(np.testing.assert_array_equal, full["params"], run.params)


def test_disk_full_during_a_save_is_one_line_and_the_next_resume_works(smoke_runs, tmp_path,
                                                                       monkeypatch, capsys):
    import orbax.checkpoint as ocp

    _, _, stopped = smoke_runs
    workdir = _copy(stopped, tmp_path)
    save = ocp.CheckpointManager.save

    def full_disk(self, step, *args, **kwargs):  # a part is written, then the disk is full
        partial = os.path.join(str(self.directory), f"{step}.orbax-checkpoint-tmp-1")
        os.makedirs(os.path.join(partial, "params"))
        open(os.path.join(partial, "params", "part"), "wb").write(b"x" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    args = (f"--workdir={workdir}", "--config.train.checkpoint_every=1")
    monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    assert _train_cli(monkeypatch, *args) == 1
    _one_error_line(capsys, rf"^error: cannot write checkpoint 5 to {re.escape(workdir)}/checkpoints: "
                            r"No space left on device$")
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4"]
    monkeypatch.setattr(ocp.CheckpointManager, "save", save)
    summary = trainer.run(_smoke(checkpoint_every=1), workdir)
    assert summary["start_step"] == 4 and summary["final_step"] == 6


def test_resume_in_a_read_only_workdir_is_one_line(smoke_runs, monkeypatch, capsys):
    """As on a read-only file system: the first write into the workdir fails (tests run as root, so
    permissions would not stop them); nothing is changed, exit 1."""
    _, _, stopped = smoke_runs
    before = snapshot(stopped)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if str(path).startswith(stopped) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert _train_cli(monkeypatch, f"--workdir={stopped}", "--config.train.checkpoint_every=1") == 1
    _one_error_line(capsys, rf"^error: {re.escape(stopped)}/run\.lock: Read-only file system$")
    monkeypatch.undo()
    assert snapshot(stopped) == before
