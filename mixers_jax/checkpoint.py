"""Checkpoints through orbax's CheckpointManager. The only module that touches orbax.

A checkpoint at step k is the folder ``<directory>/k`` with four items:

* ``params``     the parameters alone (sharded arrays), so that evaluation, generation, compression
  and inspection restore them without building an optimizer;
* ``opt_state``  ``{"step": ..., "opt_state": ...}``: the rest of the train state;
* ``data``       the data-iterator state (JSON), so a resumed run sees the very same batches;
* ``meta``       JSON: the config, the tokenizer model (base64) and free-form run information;

and, written after orbax finalized the step, ``k/mixers_jax_integrity.json``: the size and sha256 of
every file of every item. A restore verifies it, so a truncated file, a deleted metadata file or a
flipped byte is found before orbax reads anything. Checkpoints written by older versions hold one
item ``state`` (step, params, optimizer state) and no record; they still restore (``restore_params``
through orbax's partial restore of the ``params`` subtree) and are reported as unverified.

Saves are synchronous and atomic (orbax writes ``k.orbax-checkpoint-tmp-*`` and renames it); only
the last ``keep`` checkpoints are kept; a state with a NaN or an infinity is never saved.
"""
from __future__ import annotations

import base64
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic

ITEMS = ("params", "opt_state", "data", "meta")
LEGACY_ITEMS = ("state", "data", "meta")
INTEGRITY_FILE = "mixers_jax_integrity.json"
DAMAGED_SUFFIX = ".damaged"
_TMP_MARK = ".orbax-checkpoint-tmp"
_HASH_CHUNK = 1 << 20

Log = Callable[[str], None]
_UNVERIFIED = "checkpoint {step} has no integrity record (an older version wrote it): unverified"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class NonFiniteStateError(UserError):
    """A save was refused: the parameters or the optimizer state hold a NaN or an infinity."""


class CheckpointDamagedError(UserError):
    """A checkpoint fails its integrity record, or orbax cannot read it."""


class CheckpointMismatchError(UserError):
    """An intact checkpoint (its integrity record verified) that does not fit the restore target:
    the run's configuration changed the shapes or the structure of what it stores."""


class CheckpointWriteError(OSError):
    """A save failed (disk full, permissions, ...); nothing of it is left behind."""


# --------------------------------------------------------------------------------------------------
# Finiteness


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """True iff every floating (or complex) leaf of ``tree`` is finite: one reduction per leaf,
    combined into one boolean scalar on device. Usable inside a jitted step (it inlines)."""
    flags = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.asarray(True)


def non_finite_leaves(tree: Any, limit: int = 3) -> list[str]:
    """Paths of (up to ``limit``) leaves holding a NaN or an infinity; host-side, for messages."""
    bad = []
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if len(bad) >= limit:
            break
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact) and not bool(all_finite(x)):
            bad.append(jax.tree_util.keystr(path))
    return bad


# --------------------------------------------------------------------------------------------------
# Integrity records


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _item_files(step_dir: str) -> list[str]:
    """Paths (relative to ``step_dir``) of every file inside the step's item folders."""
    out = []
    for item in sorted(os.listdir(step_dir)):
        top = os.path.join(step_dir, item)
        if not os.path.isdir(top):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                out.append(os.path.relpath(os.path.join(dirpath, name), step_dir))
    return out


def write_integrity_record(step_dir: str) -> None:
    """Records the size and sha256 of every item file of a finalized step, atomically."""
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)),
                   "sha256": _sha256(os.path.join(step_dir, rel))}
             for rel in _item_files(step_dir)}
    write_atomic(os.path.join(step_dir, INTEGRITY_FILE),
                 json.dumps({"version": 1, "files": files}, indent=1, sort_keys=True))


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What the integrity check of one step found. ``problem`` is empty when the step is fine."""
    step: int
    recorded: bool  # False: no integrity record (an older version, or an unfinished save)
    problem: str = ""

    @property
    def ok(self) -> bool:
        return not self.problem


def verify_step_dir(step: int, step_dir: str) -> Verdict:
    """Checks ``step_dir`` against its integrity record (sizes first, then hashes). A step without
    a record only has its item folders' orbax metadata checked for presence."""
    record_path = os.path.join(step_dir, INTEGRITY_FILE)
    if not os.path.isdir(step_dir):
        return Verdict(step, False, "missing")
    if not os.path.exists(record_path):
        for item in os.listdir(step_dir):
            if item == "state" or item in ITEMS:
                name = "_METADATA" if item in ("state", "params", "opt_state") else "metadata"
                if not os.path.exists(os.path.join(step_dir, item, name)):
                    return Verdict(step, False, f"{item}/{name}: missing")
        return Verdict(step, False)
    try:
        with open(record_path, "rb") as f:
            files = json.loads(f.read())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return Verdict(step, True, f"{INTEGRITY_FILE}: unreadable ({e})")
    try:
        for rel, want in files.items():
            path = os.path.join(step_dir, rel)
            if not os.path.isfile(path):
                return Verdict(step, True, f"{rel}: missing")
            size = os.path.getsize(path)
            if size != want["size"]:
                return Verdict(step, True, f"{rel}: {size} bytes, expected {want['size']}")
        for rel, want in files.items():
            if _sha256(os.path.join(step_dir, rel)) != want["sha256"]:
                return Verdict(step, True, f"{rel}: hash mismatch")
    except OSError as e:  # e.g. the step was deleted while being read (a live run keeps k)
        return Verdict(step, True, f"unreadable ({e.strerror or e})")
    return Verdict(step, True)


# --------------------------------------------------------------------------------------------------
# The checkpointer


def _first_line(e: BaseException, limit: int = 300) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit] + "..."


def _root_os_error(e: BaseException) -> OSError | None:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e
        e = e.__cause__ or e.__context__
    return None


def check_keep(keep: int) -> None:
    """UserError unless ``keep`` (train.keep_checkpoints) is at least 1: with fewer, every save
    would delete the trained model. For config validation, before anything is written."""
    if int(keep) < 1:
        raise UserError(f"train.keep_checkpoints must be at least 1 (got {keep}); with fewer, "
                        "every save would delete the trained model")


def _single_process_array_writes() -> None:
    """In one process, jax arrays are written without orbax's replica-parallel split (which
    divides the bytes of a replicated array among its replicas with one small compiled slice per
    array and device): every replica is local, so the split only adds compiles — about 60 per save
    on 8 CPU devices. Same files on disk; with several processes orbax's default is kept."""
    if jax.process_count() == 1:
        ocp.type_handlers.register_type_handler(
            jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


class Checkpointer:
    """Saves and restores checkpoints in ``directory``; see the module docstring.

    ``keep`` (>= 1) is how many of the newest checkpoints are kept. ``read_only`` is for readers
    (evaluate, generate, ...): nothing is created, cleaned, moved or written. ``log`` receives the
    one-line messages (cleaned leftovers, damaged or unverified checkpoints); default: stderr.
    A writer must hold the workdir's lock (:class:`mixers_jax.lock.WorkdirLock`).
    """

    def __init__(self, directory: str, keep: int = 3, *, read_only: bool = False,
                 log: Log | None = None):
        self.directory = os.path.abspath(directory)
        self.read_only = bool(read_only)
        self._log = log or _stderr
        self._verdicts: dict[int, Verdict] = {}
        if not self.read_only:
            check_keep(keep)
            self._clean_leftovers()
            _single_process_array_writes()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=int(keep), create=True, enable_async_checkpointing=False)
        else:
            if not os.path.isdir(self.directory):
                raise UserError(f"{self.directory} does not exist")
            options = ocp.CheckpointManagerOptions(
                max_to_keep=None, create=False, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=ITEMS + ("state",))

    def _clean_leftovers(self) -> None:
        """Removes the temporary folders of saves that never finished (a killed run, a full disk):
        orbax would otherwise trip over them at the next save."""
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in sorted(os.listdir(self.directory)):
            if _TMP_MARK in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                self._log(f"removed {os.path.join(self.directory, name)}, left by an unfinished save")

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    # ---- listing

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def verify(self, step: int) -> Verdict:
        """The integrity check of ``step`` (cached: each step is hashed once per Checkpointer)."""
        if step not in self._verdicts:
            self._verdicts[step] = verify_step_dir(step, self.step_dir(step))
        return self._verdicts[step]

    def latest_intact_step(self, *, complete_only: bool = False) -> int | None:
        """The step :meth:`restore_latest` would restore (None: no checkpoint at all), with the
        same reports, fallback and errors."""
        found = self.restore_latest(lambda step: step, complete_only=complete_only)
        return None if found is None else found[0]

    # ---- saving

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        """Saves ``state`` (fields step, params, opt_state), the data-iterator state and ``meta``.

        Raises NonFiniteStateError (nothing written) when params or opt_state hold a NaN/inf, and
        CheckpointWriteError (nothing left behind) when the write fails.
        """
        if self.read_only:
            raise UserError(f"{self.directory} is open read-only")
        if os.path.exists(self.step_dir(step)):
            raise UserError(f"checkpoint {step} already exists in {self.directory}")
        if not bool(all_finite((state.params, state.opt_state))):
            bad = non_finite_leaves({"params": state.params, "opt_state": state.opt_state})
            raise NonFiniteStateError(
                f"refusing to save checkpoint {step}: non-finite values in {', '.join(bad)}")
        step = int(step)
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(state.params),
                    opt_state=ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state}),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                write_integrity_record(self.step_dir(step))
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds
            self._discard(step)
            root = _root_os_error(e)
            reason = f"{root.strerror or root}" if root is not None else _first_line(e)
            raise CheckpointWriteError(
                root.errno if root is not None else errno.EIO,
                f"cannot write checkpoint {step} to {self.directory}: {reason}") from None
        self._verdicts.pop(step, None)

    def _discard(self, step: int) -> None:
        """Removes what a failed save of ``step`` left (its temporary folder or unrecorded step)."""
        if os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name == str(step) or name.startswith(f"{step}{_TMP_MARK}"):
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        self._manager.reload()

    def set_aside(self, step: int) -> str:
        """Renames a damaged step to ``<step>.damaged`` (orbax no longer lists it, a resumed run
        may save that step again); returns the new path."""
        if self.read_only:
            raise UserError(f"{self.directory} is open read-only")
        src, dst = self.step_dir(step), self.step_dir(step) + DAMAGED_SUFFIX
        if jax.process_index() == 0:
            if os.path.exists(dst):
                shutil.rmtree(dst)
            os.replace(src, dst)
        if jax.process_count() > 1:  # every host lists the steps anew only after the rename
            ocp.multihost.sync_global_processes(f"mixers_jax_set_aside_{step}")
        self._verdicts.pop(step, None)
        self._manager.reload()
        return dst

    # ---- restoring

    def _layout(self, step: int) -> str:
        return "legacy" if os.path.isdir(os.path.join(self.step_dir(step), "state")) else "items"

    def _checked(self, step: int) -> None:
        if step not in self.all_steps():
            raise UserError(f"{self.directory} has no checkpoint at step {step} "
                            f"(has {self.all_steps()})")
        verdict = self.verify(step)
        if not verdict.ok:
            raise CheckpointDamagedError(
                f"checkpoint {step} in {self.directory} is damaged ({verdict.problem})")

    def _orbax_restore(self, step: int, **items) -> dict:
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
            raise CheckpointDamagedError(
                f"cannot restore checkpoint {step} in {self.directory}: {_first_line(e)}") from None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores ``(state, data_state, meta)``. ``abstract_state`` (ShapeDtypeStructs with target
        shardings, see :func:`abstract_like`) is a flax.struct dataclass with fields step, params,
        opt_state; the result is ``abstract_state.replace(...)`` with the arrays.

        Raises CheckpointDamagedError (one line) for a damaged or unreadable checkpoint.
        """
        self._checked(step)
        if self._layout(step) == "legacy":
            r = self._orbax_restore(step, state=ocp.args.StandardRestore(abstract_state),
                                    data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
            state = r["state"]
        else:
            r = self._orbax_restore(
                step,
                params=ocp.args.StandardRestore(abstract_state.params),
                opt_state=ocp.args.StandardRestore(
                    {"step": abstract_state.step, "opt_state": abstract_state.opt_state}),
                data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
            state = abstract_state.replace(step=r["opt_state"]["step"], params=r["params"],
                                           opt_state=r["opt_state"]["opt_state"])
        return state, r["data"], r["meta"]

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """The parameters of ``step`` alone (no optimizer needed), also from a legacy checkpoint."""
        self._checked(step)
        if self._layout(step) == "legacy":
            # orbax's partial restore reads the params subtree of the ``state`` item alone; the
            # manager has bound ``state`` to the standard handler, so a handler of its own reads it.
            target = {"params": abstract_params}
            args = ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)
            try:
                with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
                    return reader.restore(os.path.join(self.step_dir(step), "state"), args=args)["params"]
            except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
                raise CheckpointDamagedError(
                    f"cannot restore checkpoint {step} in {self.directory}: {_first_line(e)}") from None
        return self._orbax_restore(step, params=ocp.args.StandardRestore(abstract_params))["params"]

    def restore_meta(self, step: int) -> dict:
        self._checked(step)
        return self._orbax_restore(step, meta=ocp.args.JsonRestore())["meta"]

    def restore_latest(self, restore_step: Callable[[int], Any], *,
                       complete_only: bool = False) -> tuple[int, Any] | None:
        """Restores the newest intact checkpoint: ``(step, restore_step(step))``, None when there
        is no checkpoint at all.

        ``restore_step(step)`` does the restore (e.g. ``lambda s: ckpt.restore(s, abstract(s))``);
        a CheckpointDamagedError from it, or a failed integrity check, moves on to the next older
        step, reported in one line, e.g. "checkpoint 8 is damaged (params/_METADATA: missing);
        resuming from 6". A writer sets damaged newer steps aside (:meth:`set_aside`) so that the
        resumed run can save those steps again. ``complete_only`` (a reader while the run is live)
        also skips steps without an integrity record, which may be a save in progress.
        Raises CheckpointDamagedError naming the folder when checkpoints exist but none restores
        (with ``complete_only``, steps without a record alone give None: nothing complete yet).
        """
        steps = self.all_steps()
        damaged: list[tuple[int, str]] = []
        for step in reversed(steps):
            verdict = self.verify(step)
            if verdict.ok and not verdict.recorded and complete_only:
                continue
            if verdict.ok:
                try:
                    result = restore_step(step)
                except CheckpointDamagedError as e:
                    if not os.path.isdir(self.step_dir(step)):
                        continue  # removed meanwhile by the live run (it keeps the last k)
                    if verdict.recorded:  # the files are exactly those written: not damage
                        raise CheckpointMismatchError(
                            f"checkpoint {step} in {self.directory} is intact but does not fit this "
                            f"run's configuration: {str(e).split(': ', 1)[-1]}") from None
                    damaged.append((step, str(e)))
                    continue
                for bad, why in damaged:
                    if self.read_only:  # a reader moves nothing
                        self._log(f"checkpoint {bad} is damaged ({why}); reading {step} instead")
                        continue
                    moved = os.path.basename(self.set_aside(bad))
                    self._log(f"checkpoint {bad} is damaged ({why}); moved to {moved}; "
                              f"resuming from {step}")
                if not verdict.recorded:
                    self._log(_UNVERIFIED.format(step=step))
                return step, result
            if not os.path.isdir(self.step_dir(step)):
                continue  # removed meanwhile by the live run (it keeps the last k)
            damaged.append((step, verdict.problem))
        if damaged:
            details = "; ".join(f"{s}: {why}" for s, why in damaged)
            raise CheckpointDamagedError(f"no intact checkpoint in {self.directory} ({details})")
        return None

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings, the restore target for ``tree``."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


def encode_bytes(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")


def decode_bytes(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


# --------------------------------------------------------------------------------------------------
# Preemption


class PreemptionGuard:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag that the training loop polls between steps.

    The loop then saves a checkpoint and exits cleanly instead of dying mid-write. A second SIGINT
    while the first is pending raises KeyboardInterrupt at once (abort without saving). Signals are
    only caught in the main thread; the previous handlers come back on exit. The first signal is
    acknowledged on stderr at once.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested: str | None = None
        self._previous = {}
        self._signals = tuple(signals)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        if signum == signal.SIGINT and self.requested is not None:
            raise KeyboardInterrupt
        if self.requested is None:
            self.requested = name
            again = " (Ctrl-C again aborts without saving)" if signum == signal.SIGINT else ""
            # os.write, not print or a log file: the handler may interrupt a write to those.
            os.write(2, f"{name}: saving a checkpoint and stopping{again}\n".encode())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False
