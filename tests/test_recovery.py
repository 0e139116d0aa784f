"""Memory-loss recovery ρ (docs/ablations.md#memory-loss-recovery): the formula, the roles, and a
smoke run initialised from a memory model that logs ρ against two finished reference runs."""
import json
import math
import os

import pytest

from mixers_jax import curves, recovery, trainer
from mixers_jax.config import load_config
from mixers_jax.curriculum import stages
from mixers_jax.errors import UserError
from tests_util import config_path


def test_rho_is_the_share_of_the_memory_gain_kept():
    assert recovery.rho(5.0, 4.0, 3.0) == pytest.approx(0.5)
    assert recovery.rho(5.0, 3.0, 3.0) == 1.0  # freezing costs nothing
    assert recovery.rho(5.0, 5.0, 3.0) == 0.0  # frozen memories are no better than none
    assert math.isnan(recovery.rho(4.0, 4.0, 4.0))  # memories save nothing at all


def test_parse_runs_and_roles(tmp_path):
    runs = recovery.parse_runs("nomem=a, trainable=/x/b")
    assert runs == {"nomem": os.path.abspath("a"), "trainable": "/x/b"}
    for bad in ("nomem", "memory=a", "frozen="):
        with pytest.raises(UserError, match="train.recovery_runs entries look like 'ROLE=DIR'"):
            recovery.parse_runs(bad)
    config = _smoke()
    st = stages(config)[0]
    assert recovery.own_role(config.model, st) == "trainable"
    config.train.frozen = "encoder"
    assert recovery.own_role(config.model, stages(config)[0]) == "frozen"
    config.model.use_memory = False
    assert recovery.own_role(config.model, stages(config)[0]) == "nomem"


def _smoke(**train):
    """memory.py:smoke evaluated on its first evaluation objective only (clm: the loss that
    eval_history, hence ρ, reads; the preset's other four are compiled but not read here) and
    checkpointed only at its last step (the one init_from loads), with one block per stack (ρ is
    bookkeeping over evaluation losses; a second block only lengthens the compiles)."""
    config = load_config(config_path("memory", "smoke"))
    config.unlock()
    config.model.n_layers = 1
    config.train.update(dict(eval_objectives=("clm",), checkpoint_every=6), **train)
    return config


def _reference(path, history):
    os.makedirs(path)
    with open(os.path.join(path, "results.json"), "w") as f:
        json.dump({"eval_history": history}, f)
    return str(path)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A (smoke) trained memory model."""
    path = str(tmp_path_factory.mktemp("recovery") / "source")
    summary = trainer.run(_smoke(), path)
    assert [s for s, _ in summary["eval_history"]] == [3, 6]
    assert json.load(open(f"{path}/results.json"))["eval_history"] == summary["eval_history"]
    return path


def test_frozen_run_logs_rho_against_its_reference_runs(tmp_path, source):
    # the two other roles' finished runs (their evaluation losses by step; trainable lacks step 6)
    nomem = _reference(tmp_path / "nomem", [[3, 9.0], [6, 8.0]])
    trainable = _reference(tmp_path / "trainable", [[3, 5.0]])
    frozen = str(tmp_path / "frozen")
    config = _smoke(init_from=source, frozen="encoder",
                    recovery_runs=f"nomem={nomem},trainable={trainable}")
    summary = trainer.run(config, frozen)
    own = dict(summary["eval_history"])
    rec = summary["memory_recovery"]["train"]
    assert rec["role"] == "frozen" and rec["runs"] == {"nomem": nomem, "trainable": trainable}
    assert rec["rho"] == [[3, pytest.approx((9.0 - own[3]) / (9.0 - 5.0))]]
    assert json.load(open(f"{frozen}/results.json"))["memory_recovery"]["train"]["rho"] == rec["rho"]
    logged = curves.read_scalars(f"{frozen}/tb")["eval/memory_recovery"]
    assert [s for s, _ in logged] == [3] and logged[0][1] == pytest.approx(rec["rho"][0][1], rel=1e-6)
    assert "memory-loss recovery rho" in open(f"{frozen}/log.txt").read()


@pytest.mark.parametrize("train,message", [
    (dict(recovery_runs="nomem=a,trainable=b"), "needs a run initialised from a memory model"),
    (dict(init_from="SOURCE", frozen="encoder", recovery_runs="nomem=a,frozen=b"),
     r"this run is the frozen one, so name the runs of \['nomem', 'trainable'\]"),
    (dict(init_from="SOURCE", recovery_runs="nomem=NOMEM,frozen=MISSING"), "has no results.json"),
])
def test_bad_recovery_settings_stop_before_anything_is_written(tmp_path, source, train, message):
    nomem = _reference(tmp_path / "nomem", [[3, 9.0]])
    train = {k: v.replace("SOURCE", source).replace("NOMEM", nomem)
             .replace("MISSING", str(tmp_path / "missing")) for k, v in train.items()}
    workdir = tmp_path / "run"
    with pytest.raises(UserError, match=message):
        trainer.run(_smoke(**train), str(workdir))
    assert not workdir.exists()
