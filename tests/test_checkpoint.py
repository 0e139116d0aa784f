"""Checkpointer: integrity records and fallback, non-finite refusal, keep, legacy layout, failed
saves, Ctrl-C."""
import errno
import os
import shutil
import signal

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax.errors import UserError
from tests_util import CORRUPTIONS, flip_byte


@flax.struct.dataclass
class State:
    step: jax.Array
    params: dict
    opt_state: object


_TX = optax.adam(1e-2)


def _state(step, seed=0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                        "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
              "embed": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)}
    opt_state = _TX.init(params)
    # a real update so that the optimizer moments are not all zero
    updates, opt_state = _TX.update(jax.tree.map(jnp.ones_like, params), opt_state, params)
    return State(jnp.asarray(step, jnp.int32), optax.apply_updates(params, updates), opt_state)


def _abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def _assert_same(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _saved(tmp_path, steps=(6, 8), keep=3):
    messages = []
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=keep, log=messages.append)
    states = {}
    for s in steps:
        states[s] = _state(s, seed=s)
        ck.save(s, states[s], {"pos": s}, {"step": s})
    return ck, states, messages


def test_roundtrip_new_layout_and_params_alone(tmp_path):
    ck, states, _ = _saved(tmp_path)
    step_dir = ck.step_dir(8)
    assert sorted(n for n in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, n))) == [
        "data", "meta", "opt_state", "params"]
    assert os.path.exists(os.path.join(step_dir, ckpt_lib.INTEGRITY_FILE))
    state, data, meta = ck.restore(8, _abstract(states[8]))
    assert type(state) is State and data == {"pos": 8} and meta == {"step": 8}
    _assert_same(state, states[8])
    _assert_same(ck.restore_params(6, _abstract(states[6].params)), states[6].params)
    assert ck.restore_meta(6) == {"step": 6}
    ck.close()
    reader = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    assert reader.all_steps() == [6, 8] and reader.latest_intact_step() == 8
    with pytest.raises(UserError, match="read-only"):
        reader.save(9, states[8], {}, {})
    reader.close()


@pytest.mark.parametrize("keep", [0, -1])
def test_keep_below_one_is_refused(tmp_path, keep):
    with pytest.raises(UserError, match="at least 1"):
        ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=keep)
    with pytest.raises(UserError, match=f"keep_checkpoints must be at least 1 \\(got {keep}\\)"):
        ckpt_lib.check_keep(keep)
    assert not os.path.exists(tmp_path / "ckpt")


def test_all_finite_inside_and_outside_jit():
    good = _state(1)
    assert bool(ckpt_lib.all_finite(good)) and bool(ckpt_lib.all_finite({}))
    bad = good.replace(params=jax.tree.map(lambda x: x.at[0].set(jnp.inf) if x.ndim == 1 else x,
                                           good.params))
    assert not bool(ckpt_lib.all_finite(bad))
    checked = jax.jit(lambda s: (s.step + 1, ckpt_lib.all_finite(s)))
    assert bool(checked(good)[1]) and not bool(checked(bad)[1])
    assert ckpt_lib.all_finite(good).shape == () and ckpt_lib.all_finite(good).dtype == jnp.bool_


@pytest.mark.parametrize("where", ["params", "opt_state"])
def test_non_finite_state_is_not_saved(tmp_path, where):
    ck, states, _ = _saved(tmp_path, steps=(6,))
    state = states[6]
    if where == "params":
        bad = state.replace(params={**state.params, "embed": state.params["embed"].at[3, 1].set(jnp.nan)})
    else:
        mu = state.opt_state[0].mu
        adam = state.opt_state[0]._replace(mu={**mu, "embed": mu["embed"].at[0, 0].set(jnp.nan)})
        bad = state.replace(opt_state=(adam,) + tuple(state.opt_state[1:]))
    with pytest.raises(ckpt_lib.NonFiniteStateError, match=f"checkpoint 8: non-finite values in .*{where}.*embed"):
        ck.save(8, bad, {}, {})
    assert ck.all_steps() == [6] and os.listdir(ck.directory) == ["6"]


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_damaged_latest_falls_back_to_older(tmp_path, kind):
    ck, states, messages = _saved(tmp_path)
    ck.close()
    corrupt, problem = CORRUPTIONS[kind]
    corrupt(os.path.join(tmp_path, "ckpt", "8"))

    # A reader reports and skips the damaged step but moves nothing.
    reader_log = []
    reader = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True, log=reader_log.append)
    assert reader.latest_intact_step() == 6
    assert reader_log == [f"checkpoint 8 is damaged ({problem})"] or problem in reader_log[0]
    step, params = reader.restore_latest(lambda s: reader.restore_params(s, _abstract(states[s].params)))
    assert step == 6
    assert reader_log[-1].startswith("checkpoint 8 is damaged (") and reader_log[-1].endswith(
        "; reading 6 instead")
    _assert_same(params, states[6].params)
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match="checkpoint 8 .* is damaged"):
        reader.restore(8, _abstract(states[8]))
    assert reader.all_steps() == [6, 8]
    reader.close()

    # The resuming writer restores 6 with identical arrays, sets 8 aside and can save 8 again.
    messages.clear()
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=3, log=messages.append)
    step, (state, data, meta) = ck.restore_latest(lambda s: ck.restore(s, _abstract(states[s])))
    assert (step, data, meta) == (6, {"pos": 6}, {"step": 6})
    _assert_same(state, states[6])
    assert len(messages) == 1 and messages[0].startswith("checkpoint 8 is damaged (")
    assert problem in messages[0] and messages[0].endswith("moved to 8.damaged; resuming from 6")
    assert ck.all_steps() == [6] and os.path.isdir(tmp_path / "ckpt" / "8.damaged")
    ck.save(8, states[8], {"pos": 8}, {"step": 8})
    assert ck.all_steps() == [6, 8] and ck.verify(8).ok
    ck.close()


def test_no_intact_checkpoint_names_the_folder(tmp_path):
    ck, states, _ = _saved(tmp_path)
    for s in (6, 8):
        flip_byte(ck.step_dir(s))
    ck.close()
    reader = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True, log=lambda m: None)
    with pytest.raises(ckpt_lib.CheckpointDamagedError, match=f"no intact checkpoint in {tmp_path}/ckpt"):
        reader.restore_latest(lambda s: reader.restore(s, _abstract(states[s])))
    with pytest.raises(UserError, match="no intact checkpoint"):
        reader.latest_intact_step()
    empty = ckpt_lib.Checkpointer(str(tmp_path / "empty"), keep=2)
    assert empty.restore_latest(lambda s: 1 / 0) is None and empty.latest_intact_step() is None


def test_intact_checkpoint_that_does_not_fit_the_config_is_not_called_damaged(tmp_path):
    """A verified checkpoint whose structure differs from the restore target (the run's settings
    changed) is a one-line error; nothing is set aside and no older step is silently used."""
    ck, states, messages = _saved(tmp_path)
    other = _abstract(states[8]).replace(
        params={"dense": {"kernel": jax.ShapeDtypeStruct((16, 4), jnp.float32)}})
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match="checkpoint 8 in .* is intact but does not fit this run's configuration"):
        ck.restore_latest(lambda s: ck.restore(s, other))
    assert ck.all_steps() == [6, 8] and not messages
    ck.close()


def _write_legacy(directory, steps_states):
    """A checkpoint folder as older versions wrote it: one ``state`` item, no integrity record."""
    manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=3, create=True,
                                                        enable_async_checkpointing=False),
        item_names=("state", "data", "meta"))
    for step, state in steps_states.items():
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave({"pos": step}),
            meta=ocp.args.JsonSave({"step": step})), force=True)
    manager.wait_until_finished()
    manager.close()


def test_legacy_layout_restores_fully_and_params_alone(tmp_path):
    states = {4: _state(4, seed=4), 6: _state(6, seed=6)}
    directory = str(tmp_path / "ckpt")
    _write_legacy(directory, states)
    assert os.path.isdir(os.path.join(directory, "6", "state"))
    messages = []
    reader = ckpt_lib.Checkpointer(directory, read_only=True, log=messages.append)
    state, data, meta = reader.restore(6, _abstract(states[6]))
    _assert_same(state, states[6])
    assert (data, meta) == ({"pos": 6}, {"step": 6})
    _assert_same(reader.restore_params(4, _abstract(states[4].params)), states[4].params)
    assert reader.restore_meta(4) == {"step": 4}
    step, _ = reader.restore_latest(lambda s: reader.restore_params(s, _abstract(states[s].params)))
    assert step == 6 and messages == [
        "checkpoint 6 has no integrity record (an older version wrote it): unverified"]
    # While the run is live a reader takes only recorded (complete) steps.
    assert reader.restore_latest(lambda s: s, complete_only=True) is None
    assert reader.latest_intact_step(complete_only=True) is None
    reader.close()

    # A damaged legacy step (its orbax metadata deleted) falls back as well.
    os.remove(os.path.join(directory, "6", "state", "_METADATA"))
    messages.clear()
    writer = ckpt_lib.Checkpointer(directory, keep=3, log=messages.append)
    step, (state, _, _) = writer.restore_latest(lambda s: writer.restore(s, _abstract(states[s])))
    assert step == 4
    _assert_same(state, states[4])
    assert messages[0] == ("checkpoint 6 is damaged (state/_METADATA: missing); moved to 6.damaged; "
                           "resuming from 4")
    # A new save next to legacy steps uses the new layout.
    writer.save(6, states[6], {"pos": 6}, {"step": 6})
    assert os.path.isdir(os.path.join(directory, "6", "params")) and writer.verify(6).recorded
    writer.close()


def test_complete_only_skips_unrecorded_steps(tmp_path):
    ck, states, _ = _saved(tmp_path)
    os.remove(os.path.join(ck.step_dir(8), ckpt_lib.INTEGRITY_FILE))  # a save still finishing
    ck.close()
    reader = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True, log=lambda m: None)
    assert reader.latest_intact_step(complete_only=True) == 6
    assert reader.restore_latest(lambda s: s, complete_only=True) == (6, 6)
    assert reader.latest_intact_step() == 8  # not live: an unrecorded step is accepted, unverified


def test_failed_save_is_one_oserror_and_leaves_nothing(tmp_path, monkeypatch):
    ck, states, messages = _saved(tmp_path, steps=(6,))
    real_rename = os.rename

    def full_disk(src, dst, *a, **k):
        if ".orbax-checkpoint-tmp" in os.fspath(src):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(src))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "rename", full_disk)
    with pytest.raises(ckpt_lib.CheckpointWriteError) as info:
        ck.save(8, states[6], {"pos": 8}, {"step": 8})
    monkeypatch.setattr(os, "rename", real_rename)
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert str(info.value) == (f"[Errno {errno.ENOSPC}] cannot write checkpoint 8 to {ck.directory}: "
                               "No space left on device")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert sorted(os.listdir(ck.directory)) == ["6"] and ck.all_steps() == [6]
    ck.save(8, states[6], {"pos": 8}, {"step": 8})  # the disk has room again
    assert ck.all_steps() == [6, 8]
    ck.close()


def test_leftover_temporary_folders_are_cleaned_at_start(tmp_path):
    ck, states, _ = _saved(tmp_path, steps=(6,))
    ck.close()
    leftover = tmp_path / "ckpt" / "8.orbax-checkpoint-tmp-1234"
    shutil.copytree(tmp_path / "ckpt" / "6", leftover)
    reader = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), read_only=True)
    assert reader.all_steps() == [6] and leftover.exists()  # a reader never deletes
    messages = []
    ck = ckpt_lib.Checkpointer(str(tmp_path / "ckpt"), keep=3, log=messages.append)
    assert not leftover.exists()
    assert messages == [f"removed {leftover}, left by an unfinished save"]
    ck.save(8, states[6], {}, {})
    assert ck.all_steps() == [6, 8]


def test_keep_deletes_only_older_steps(tmp_path):
    ck, _, _ = _saved(tmp_path, steps=(2, 4, 6), keep=1)
    assert ck.all_steps() == [6] and ck.verify(6).ok


def test_sigint_requests_a_save_and_a_second_one_aborts(capfd):
    before = signal.getsignal(signal.SIGINT)
    with ckpt_lib.PreemptionGuard() as guard:
        assert guard.requested is None
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested == "SIGINT"
        assert capfd.readouterr().err == (
            "SIGINT: saving a checkpoint and stopping (Ctrl-C again aborts without saving)\n")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    with ckpt_lib.PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM only keeps the request
        assert guard.requested == "SIGTERM"
    assert capfd.readouterr().err == "SIGTERM: saving a checkpoint and stopping\n"


def test_saving_an_existing_step_is_refused_and_keeps_it(tmp_path):
    ck, states, _ = _saved(tmp_path, steps=(6,))
    with pytest.raises(UserError, match="checkpoint 6 already exists"):
        ck.save(6, states[6], {}, {})
    assert ck.verify(6).ok and ck.all_steps() == [6]
