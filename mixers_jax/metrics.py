"""Metrics from summed statistics, and the tensorboardX writer.

Aggregation (REFERENCE §12.25): evaluation reports the *token-weighted* mean over all evaluation
targets, so that loss and bits per byte describe the same text: bits per byte = Σ NLL (nats) /
(ln 2 · Σ UTF-8 bytes of the targets), exactly (REFERENCE §7).
"""
from __future__ import annotations

import math
import os
from typing import Mapping

import numpy as np

LN2 = math.log(2.0)


def bits_per_byte(nll_nats: float, n_bytes: float) -> float:
    """Exact bits per byte of text whose targets sum to ``nll_nats`` over ``n_bytes`` bytes."""
    return float(nll_nats) / (LN2 * float(n_bytes)) if n_bytes else float("nan")


def summarize(sums: Mapping[str, float]) -> dict[str, float]:
    """loss (nats/token), accuracy and bits per byte from ``nll/tokens/correct/bytes`` sums."""
    tokens = float(sums["tokens"])
    return {
        "loss": float(sums["nll"]) / tokens if tokens else float("nan"),
        "accuracy": float(sums["correct"]) / tokens if tokens else float("nan"),
        "bpb": bits_per_byte(sums["nll"], sums["bytes"]),
        "tokens": tokens,
        "bytes": float(sums["bytes"]),
    }


def add_sums(total: dict[str, float] | None, sums: Mapping[str, object]) -> dict[str, float]:
    sums = {k: float(np.asarray(v)) for k, v in sums.items()}
    if total is None:
        return sums
    return {k: total[k] + sums[k] for k in total}


class Writer:
    """tensorboardX scalars; a no-op on processes other than 0 (multi-host runs)."""

    def __init__(self, logdir: str, enabled: bool = True):
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self._writer = SummaryWriter(logdir)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            self._writer.add_scalar(name, float(value), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def compressor_bpb(data: bytes) -> dict[str, float]:
    """Bits per byte of classical compressors on ``data``: gzip -9, bz2 -9 and xz -9e."""
    import bz2
    import gzip
    import lzma

    if not data:
        return {}
    n = len(data)
    return {
        "gzip-9": 8.0 * len(gzip.compress(data, compresslevel=9, mtime=0)) / n,
        "bz2-9": 8.0 * len(bz2.compress(data, compresslevel=9)) / n,
        "xz-9e": 8.0 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / n,
    }


def batches_text(batches, tokenizer) -> bytes:
    """The UTF-8 text that the counted tokens of ``batches`` decode to (for compressor baselines)."""
    parts = []
    for batch in batches:
        for tokens, mask in zip(batch["tokens"], batch["loss_mask"]):
            parts.append(tokenizer.decode([int(t) for t in tokens[mask > 0]]))
    return "".join(parts).encode("utf-8")
