"""XLA's own log output captured around a compile, and the SPMD partitioner's warnings counted in it.

When the SPMD partitioner cannot move an array from one sharding to another with a collective
(an all-to-all, a slice of a replicated value, an all-gather along one axis), it logs

    [SPMD] Involuntary full rematerialization. The compiler cannot go from sharding A to B
    efficiently for HLO operation %name = f32[...] ...

and replicates the whole array on every device before cutting out the new shards: communication
and memory that a real pod pays at every step, invisible in the program's results. These lines
come from XLA's C++ logging, which writes straight to file descriptor 2, not through Python's
``sys.stderr`` or ``logging``; :func:`capture` therefore points descriptor 2 at a temporary file
for the duration of the compile, then writes what it caught back to the real stderr (nothing is
hidden) and keeps the text.

A count is only meaningful when XLA really compiled and was allowed to warn: a program JAX already
holds in memory or reads from the persistent compilation cache is not compiled (so nothing is
logged), and ``TF_CPP_MIN_LOG_LEVEL`` >= 2 silences warnings. In each case
:attr:`CompileLog.involuntary_remats` is None, not 0.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import tempfile
from typing import Iterator

import jax

INVOLUNTARY_REMAT = "Involuntary full rematerialization"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # also around a cache read
_OPERATION = re.compile(r"for HLO operation %(\S+) = (\S+?)\{")


@dataclasses.dataclass
class CompileLog:
    """What XLA logged while the ``with capture() as log`` block ran."""

    text: str = ""
    compiles: int = 0  # backend compilations (or persistent-cache reads) started in the block
    cache_hit: bool = False  # an executable came from the persistent compilation cache
    warnings_suppressed: bool = False  # TF_CPP_MIN_LOG_LEVEL >= 2 when the capture started

    @property
    def counted(self) -> bool:
        """XLA compiled something in the block and could warn: the count means what it says."""
        return self.compiles > 0 and not (self.cache_hit or self.warnings_suppressed)

    @property
    def involuntary_remats(self) -> int | None:
        """The number of involuntary full rematerializations logged; None when it cannot be known
        (nothing compiled, a cache hit, warnings silenced)."""
        if not self.counted:
            return None
        return sum(INVOLUNTARY_REMAT in line for line in self.text.splitlines())

    def remat_operations(self) -> list[str]:
        """'name shape' of each rematerialized HLO operation, in log order
        (e.g. 'gather f32[384,256,256]')."""
        return [f"{m.group(1)} {m.group(2)}" for line in self.text.splitlines()
                if INVOLUNTARY_REMAT in line for m in [_OPERATION.search(line)] if m]


def _log_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") or 0)
    except ValueError:
        return 0


@contextlib.contextmanager
def capture(echo: bool = True) -> Iterator[CompileLog]:
    """Captures everything written to file descriptor 2 (XLA's C++ log) inside the block into the
    yielded :class:`CompileLog`; with ``echo`` the text is written to the real stderr afterwards.
    Also notes, from JAX's monitoring events, whether a compile ran and whether the persistent
    cache answered it."""
    log = CompileLog(warnings_suppressed=_log_level() >= 2)

    def on_event(event: str, **_) -> None:
        if event == _CACHE_HIT_EVENT:
            log.cache_hit = True

    def on_duration(event: str, duration: float, **_) -> None:
        if event == _COMPILE_EVENT:
            log.compiles += 1

    sys.stderr.flush()
    saved_fd = os.dup(2)
    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield log
            finally:
                sys.stderr.flush()
                os.dup2(saved_fd, 2)
                sink.seek(0)
                raw = sink.read()
        log.text = raw.decode("utf-8", errors="replace")
        if echo and raw:
            os.write(2, raw)
    finally:
        os.close(saved_fd)
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_duration)
