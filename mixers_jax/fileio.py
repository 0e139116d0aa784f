"""File helpers shared by the commands: reads that fail in one line, writes that never half-land."""
from __future__ import annotations

import os
import tempfile

from mixers_jax.errors import UserError


def read_bytes(path: str) -> bytes:
    """The file's bytes; an unreadable path raises UserError naming it."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def write_atomic(path: str, data: bytes | str) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Readers see the old file or the whole new one, never a part; the temporary file is removed if
    anything fails (the OSError propagates; one raised before writing names ``path``). The file is made world-readable (mode 0644).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as e:  # name the file asked for, not the temporary one
        raise OSError(e.errno, e.strerror, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
