"""Figures and JSON of the analysis probes, written atomically; values drawn over a text's tokens.

matplotlib is optional and heavy, so it is imported inside :func:`pyplot` (Agg backend, no display).
"""
from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Sequence

from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic


def pyplot():
    """matplotlib.pyplot on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def check_image_path(path: str) -> str:
    """``path`` if matplotlib can write its format (by extension), else ``UserError``."""
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    formats = pyplot().gcf().canvas.get_supported_filetypes()
    pyplot().close("all")
    if ext not in formats:
        raise UserError(f"cannot write a figure to {path!r}: use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")
    return path


def save(fig, path: str, dpi: int = 120) -> None:
    """Writes ``fig`` to ``path`` (format from its extension) through a temporary file; closes it."""
    buf = io.BytesIO()
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    write_atomic(path, buf.getvalue())


def write_json(obj: Any, path: str) -> None:
    write_atomic(path, json.dumps(obj, indent=1, allow_nan=False) + "\n")


def display_piece(piece: str, text: str) -> str:
    """A token as drawn: its piece with sentencepiece's word mark as a space, or for a byte-fallback
    piece (``<0x0A>``) the ``text`` it decodes to; newlines as ⏎."""
    shown = text if piece.startswith("<0x") and piece.endswith(">") else piece.replace("\u2581", " ")
    return shown.replace("\n", "⏎")


def _layout(pieces: Sequence[str], width: int) -> list[tuple[int, int]]:
    """(line, column) of each piece, wrapping at ``width`` characters and after each ⏎."""
    out, line, col = [], 0, 0
    for p in pieces:
        w = max(1, len(p))
        if col and col + w > width:
            line, col = line + 1, 0
        out.append((line, col))
        col += w
        if p.endswith("⏎"):
            line, col = line + 1, 0
    return out


def token_heatmap(pieces: Sequence[str], panels: Sequence[tuple[str, Sequence[float]]], path: str,
                  title: str = "", width: int = 72, cmap: str = "viridis") -> None:
    """One panel per (label, values): each token's text on a box coloured by its value (one
    colour scale per panel, its colour bar beside it; NaN = no value, drawn grey)."""
    plt = pyplot()
    import matplotlib as mpl

    width = max(8, min(width, sum(max(1, len(p)) for p in pieces)))
    where = _layout(pieces, width)
    lines = (where[-1][0] + 1) if where else 1
    fig, axes = plt.subplots(len(panels), 1, squeeze=False,  # 7 pt monospace: 0.06 in a character
                             figsize=(width * 0.062 + 1.2, len(panels) * (lines * 0.2 + 0.5) + 0.3))
    colormap = mpl.colormaps[cmap]
    for i, (ax, (label, values)) in enumerate(zip(axes[:, 0], panels)):
        finite = [v for v in values if v is not None and math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        norm = mpl.colors.Normalize(lo, hi if hi > lo else lo + 1.0)
        for p, (ln, col), v in zip(pieces, where, values):
            ok = v is not None and math.isfinite(v)
            face = colormap(norm(v)) if ok else (0.85, 0.85, 0.85, 1.0)
            dark = ok and sum(face[:3]) < 1.5
            ax.text(col, ln + 0.5, p if p.strip() else p.replace(" ", "\u2423"), family="monospace",
                    fontsize=7, va="center", ha="left", color="white" if dark else "black",
                    bbox=dict(facecolor=face, edgecolor="none", pad=0.6))
        ax.set_xlim(-0.5, width + 0.5)
        ax.set_ylim(lines, 0)
        ax.axis("off")
        ax.set_title(f"{title}\n{label}" if title and i == 0 else label, fontsize=8, loc="left")
        fig.colorbar(mpl.cm.ScalarMappable(norm=norm, cmap=colormap), ax=ax, fraction=0.02, pad=0.01)
    save(fig, path)
