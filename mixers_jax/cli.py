"""What every ``python -m mixers_jax.<command>`` shares: flag parsing and the exit status.

Each command defines its flags on its own ``absl.flags.FlagValues`` (``FLAGS = cli.flag_values()``;
commands share flag names such as ``--workdir`` and may be imported together) and ends with
``cli.run(main, FLAGS, ...)``, which runs ``main`` under ``absl.app.run`` and turns every outcome into
one exit status:

====  ============================================================================================
0     finished.
1     failure. An unexpected internal error keeps its traceback; an ``OSError`` (permission denied,
      disk full, ...) is one line ``error: <what>: <strerror>``; a training run that diverged (a
      non-finite loss, gradient norm, state or evaluation) is one line naming the step and the
      last good checkpoint.
2     user error: a bad flag (unknown, bad value, missing required flag, unexpected positional
      argument), config key or value, data or workdir. One line ``error: ...``; nothing written.
75    preempted (``EX_TEMPFAIL``): SIGTERM or Ctrl-C during training saved a checkpoint; rerun the
      same command to resume. One line ``preempted: ...``.
130   interrupted: Ctrl-C outside training. One line ``interrupted``; nothing half-written (outputs
      are written through a temporary file and a rename).
====  ============================================================================================

``--help`` prints the command's docstring and its flags and exits 0.

Host memory (:func:`reuse_host_memory`, called by ``run`` before JAX loads): XLA:CPU allocates
every execution's temporaries in one block (620 MB for the main job's train step) from a worker
thread and frees it when the step ends. glibc serves a block that large in a thread arena by a
fresh ``mmap`` and unmaps it on free, so every step touched all of it anew (159k minor page faults
and 0.23 s of kernel time per step of the main job). One arena, no ``mmap`` and no trimming below
2 GiB keep the freed block in the process for the next step (0 page faults per step). Set
``MIXERS_JAX_HOST_MALLOC=system`` to keep glibc's defaults; other C libraries are left alone.

Imports: a command module imports JAX (and every library module that imports it) inside ``main``,
so that ``--help`` and bad flags answer without loading JAX; everything else is imported at the
top of the module.
"""
from __future__ import annotations

import ast
import ctypes
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from mixers_jax.errors import Preempted, UserError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

_HELP = ("--help", "-h", "--helpfull", "--helpshort", "-?")


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
HOST_MALLOC_ENV = "MIXERS_JAX_HOST_MALLOC"


def reuse_host_memory() -> bool:
    """glibc only: one malloc arena, no mmap'd blocks, trimming only above 2 GiB, so that memory
    freed after a step is reused by the next instead of being unmapped and faulted in again
    (module docstring). Must run before JAX starts its threads. Returns whether it was applied;
    ``MIXERS_JAX_HOST_MALLOC=system`` (or any C library without ``gnu_get_libc_version``) leaves
    the allocator as it is. Allocation never changes a computed value."""
    if os.environ.get(HOST_MALLOC_ENV, "reuse") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(mallopt(param, value) == 1 for param, value in settings)


def flag_values() -> flags.FlagValues:
    """A command's own flag set (commands are imported together, so they do not share FLAGS)."""
    return flags.FlagValues()


def error(message: str) -> None:
    """Prints ``error: message`` on stderr."""
    print(f"error: {message}", file=sys.stderr, flush=True)


def os_error_line(e: OSError) -> str:
    """``<what>: <strerror>`` of an OSError (the file it names, else the error itself)."""
    what = e.filename if e.filename is not None else ""
    if e.filename2 is not None:
        what = f"{what} -> {e.filename2}"
    reason = e.strerror or str(e) or type(e).__name__
    return f"{what}: {reason}" if what else reason


def config_error_line(e: BaseException) -> str:
    """The gist of an ml_collections config-file / override error, in one line.

    A config file that does not compile is reported with its file and line; a missing file by its
    path; an unknown key with the key and absl's suggestion.
    """
    syntax = e if isinstance(e, SyntaxError) else e.__cause__ or e.__context__
    if isinstance(syntax, SyntaxError):
        where = f"config file {syntax.filename}: " if syntax.filename else "config file: "
        return f"{where}{type(syntax).__name__}: {syntax.msg} (line {syntax.lineno})"
    text = str(e.args[0]) if e.args else str(e)
    wrapped_key = isinstance(e, KeyError) or text[:1] in "'\""
    for _ in range(3):  # ml_collections wraps KeyError reprs in quotes, sometimes twice
        if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
            try:
                text = str(ast.literal_eval(text))
            except (ValueError, SyntaxError):
                break
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if any("No such file" in ln for ln in lines):
        missing = next(ln for ln in lines if "No such file" in ln)
        return "config file not found: " + missing.rsplit(":", 1)[-1].strip().strip("'")
    if wrapped_key or any(ln.startswith("Did you mean") for ln in lines):
        key = lines[0].strip("'\"") if lines else "?"
        hint = next((f" ({ln[0].lower()}{ln[1:]})" for ln in lines if ln.startswith("Did you mean")), "")
        return f"unknown config key {key!r}{hint}"
    last = lines[-1] if lines else type(e).__name__
    return last.split(": ", 1)[1] if last.startswith(("ValueError: ", "KeyError: ")) else last


def _flag_error_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _exit(status: int, message: str | None = None) -> None:
    if message is not None:
        error(message)
    raise SystemExit(status)


def _parser(fv: flags.FlagValues, doc: str, positional: Sequence[str], required: Sequence[str],
            config: Any | None) -> Callable[[list[str]], list[str]]:
    def parse(argv: list[str]) -> list[str]:
        if any(a in _HELP for a in argv[1:]):
            print((doc or "").strip() + "\n\nflags:\n" + fv.get_help())
            raise SystemExit(EXIT_OK)
        for name in list(fv):  # a second run in one process starts from the defaults
            fv[name].unparse()
        try:
            rest = fv(list(argv))
            if config is not None and config.value is not None:
                _ = config.value.name  # config files load lazily; surface their errors here
        except flags.Error as e:
            from_config = config is not None and (e.__cause__ or e.__context__) is not None
            _exit(EXIT_USER_ERROR, config_error_line(e) if from_config else _flag_error_line(e))
        except Exception as e:  # noqa: BLE001 - a config file's own error (syntax, key, value)
            if config is None:
                raise
            _exit(EXIT_USER_ERROR, config_error_line(e))
        args = rest[1:]
        if len(args) > len(positional):
            _exit(EXIT_USER_ERROR, f"unexpected arguments: {' '.join(args[len(positional):])}")
        if len(args) < len(positional):
            _exit(EXIT_USER_ERROR, "missing arguments: expected " + " ".join(positional))
        for name in required:
            if fv[name].value in (None, "", []):
                _exit(EXIT_USER_ERROR, f"--{name} is required")
        flags.FLAGS.mark_as_parsed()  # absl's own flags keep their defaults
        return rest

    return parse


def _guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], None]:
    def call(argv: list[str]) -> None:
        try:
            status = main(argv)
        except UserError as e:
            _exit(EXIT_USER_ERROR, str(e))
        except Preempted as e:
            print(f"preempted: {e}", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_PREEMPTED) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        except OSError as e:
            _exit(EXIT_FAILURE, os_error_line(e))
        raise SystemExit(EXIT_OK if status is None else int(status))

    return call


def run(main: Callable[[list[str]], Any], fv: flags.FlagValues, *, doc: str = "",
        argv: Sequence[str] | None = None, positional: Sequence[str] = (),
        required: Sequence[str] = (), config: Any | None = None) -> None:
    """Parses ``argv`` (default ``sys.argv``) into ``fv`` and runs ``main(argv)`` under
    ``absl.app.run``; always ends in ``SystemExit`` with the status of the table above.

    ``positional``: names of the positional arguments the command takes (exactly that many);
    ``required``: flags that must be given; ``config``: the holder of an ml_collections config-file
    flag defined on ``fv``, whose loading errors become one line.
    """
    argv = list(sys.argv if argv is None else argv)
    reuse_host_memory()
    try:
        app.run(_guarded(main), argv=argv,
                flags_parser=_parser(fv, doc, tuple(positional), tuple(required), config))
    except KeyboardInterrupt:  # during flag parsing (a config file being loaded)
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
