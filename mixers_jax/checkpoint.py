"""Checkpoints through orbax's CheckpointManager. The only module that touches orbax.

A checkpoint at step k holds three items:

* ``state``  the train state (step, params, optimizer state), sharded arrays;
* ``data``   the data-iterator state (JSON), so a resumed run sees the very same batches;
* ``meta``   JSON: the config, the tokenizer model (base64) and free-form run information.

Saves are synchronous and atomic (orbax writes a temporary directory and renames it), and only the
last ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import base64
import os
import signal
import threading
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 3):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        )
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "meta")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
        self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict]:
        """Restores ``(state, data_state, meta)``; ``abstract_state`` carries target shardings."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["data"], restored["meta"]

    def restore_meta(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

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


class PreemptionGuard:
    """Turns SIGTERM (and SIGINT) into a flag that the training loop polls between steps.

    The loop then saves a checkpoint and exits cleanly instead of dying mid-write.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested: str | None = None
        self._previous = {}
        self._signals = signals

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self._signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
