"""Metrics from summed statistics, the compression accounting of stored embeddings, and the
tensorboardX writer.

Aggregation (docs/metrics.md#aggregation): evaluation reports the *token-weighted* mean over all evaluation
targets, so that loss and bits per byte describe the same text: bits per byte = Σ NLL (nats) /
(ln 2 · Σ UTF-8 bytes of the targets), exactly (docs/metrics.md#bits-per-byte).
"""
from __future__ import annotations

import bz2
import gzip
import lzma
import math
import os
from typing import Mapping

import numpy as np

from mixers_jax.models import sub_config

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


# --------------------------------------------------------------------------- compression accounting
#
# A model that stores one embedding of n_p numbers at b_p bits per sequence (autoencoders,
# embedding-augmented LMs) has to pay for that embedding when it is compared with a causal model or a
# compressor (docs/metrics.md#stored-embedding-accounting). The functions below use the exact
# forms over an evaluation set of
# ``sequences`` rows with Σ targets tokens and Σ bytes target bytes; with every position a target and
# r = Σ bytes / Σ targets they reduce to the per-sequence formulas of the reference.

# docs/metrics.md#information-retention-ratio
H0_PUBLISHED = 9.03  # the blog's uniform-over-8000 reference entropy (nats)


def amortized_embedding_bpb(stored_numbers: int, bits: float, sequences: int, n_bytes: float) -> float:
    """Embedding bits per byte b_e = n_p · b_p · sequences / Σ bytes.

    The exact form of b_e = n_p b_p / (n_ctx r): every one of ``sequences`` rows stores
    ``stored_numbers`` (n_p) numbers of ``bits`` (b_p) bits, spread over the ``n_bytes`` target bytes.
    """
    return float(stored_numbers) * float(bits) * float(sequences) / float(n_bytes) if n_bytes else float("nan")


def loss_offset(stored_numbers: int, bits: float, sequences: int, tokens: float) -> float:
    """Loss offset L_o = n_p · b_p · ln 2 · sequences / Σ targets, in nats per token.

    Equals n_p b_p ln 2 / n_ctx when every position of every row is a target; e.g. 64 numbers at
    4 bits with n_ctx 1024 give 0.173.
    """
    return float(stored_numbers) * float(bits) * LN2 * float(sequences) / float(tokens) if tokens else float("nan")


def embedding_accounting(
    sums: Mapping[str, float], stored_numbers: int, bits: float, sequences: int
) -> dict[str, float]:
    """Decoder loss and bits per byte plus the cost of the stored embeddings.

    From the summed ``nll`` / ``tokens`` / ``bytes``: ``loss`` = Σ nll / Σ targets, ``bpb`` (the
    decoder's), ``loss_offset`` L_o, ``normalized_loss`` = loss + L_o, ``embedding_bpb`` b_e and
    ``total_bpb`` = bpb + b_e.
    """
    tokens, n_bytes = float(sums["tokens"]), float(sums["bytes"])
    loss = float(sums["nll"]) / tokens if tokens else float("nan")
    bpb = bits_per_byte(sums["nll"], n_bytes)
    offset = loss_offset(stored_numbers, bits, sequences, tokens)
    b_e = amortized_embedding_bpb(stored_numbers, bits, sequences, n_bytes)
    return {
        "loss": loss,
        "bpb": bpb,
        "loss_offset": offset,
        "normalized_loss": loss + offset,
        "embedding_bpb": b_e,
        "total_bpb": bpb + b_e,
    }


def information_ratio(ce: float, h0: float = H0_PUBLISHED) -> float:
    """Information retention I_e = 1 − H / H0 of a probe whose reconstruction CE is H.

    ``h0`` = 9.03 reproduces the published figures; :func:`information_ratio_exact` uses
    H0 = ln V, the entropy of a uniform distribution over the vocabulary.
    """
    return 1.0 - float(ce) / float(h0)


def information_ratio_exact(ce: float, vocab_size: int) -> float:
    """I_e with H0 = ln V (ln 8000 = 8.987 for the published vocabulary)."""
    return information_ratio(ce, math.log(int(vocab_size)))


STORED_EMBEDDING_KINDS = ("autoencoder", "embedding_clm")


def stored_numbers(model_cfg) -> int | None:
    """Numbers stored per sequence: d_enc // compression for kinds that keep one embedding per
    sequence ('autoencoder', 'embedding_clm'; d_enc is the encoder width); None for other kinds."""
    kind = _field(model_cfg, "kind")
    if kind not in STORED_EMBEDDING_KINDS:
        return None
    d_enc = int(sub_config(model_cfg, "encoder")["d_model"])
    return d_enc // max(1, int(_field(model_cfg, "compression", 1) or 1))


def _field(cfg, key: str, default=None):
    try:
        return cfg[key]
    except (KeyError, TypeError):
        return getattr(cfg, key, default)


# --------------------------------------------------------------------------- evaluation scores


def summarize_sums(sums) -> dict[str, float]:
    """:func:`summarize` of the plain sums, plus ``<prefix>_<metric>`` for prefixed sums (e.g. the
    copy pass of 'combined': ``copy_loss``, ``copy_accuracy``, ...)."""
    keys = ("nll", "tokens", "correct", "bytes")
    out = summarize({k: sums[k] for k in keys})
    prefixes = sorted({k[: -len(b) - 1] for k in sums for b in keys if k.endswith("_" + b)})
    for prefix in prefixes:
        if all(f"{prefix}_{b}" in sums for b in keys):
            sub = summarize({b: sums[f"{prefix}_{b}"] for b in keys})
            out.update({f"{prefix}_{k}": v for k, v in sub.items()})
    return out


def accounting(model_cfg, sums, sequences: int, bits: float | None = None) -> dict[str, float]:
    """The compression accounting of a model's evaluation sums over ``sequences`` rows.

    For kinds that store one embedding per sequence (:func:`stored_numbers` n_p numbers at ``bits``
    bits, default ``model.embed_bits``): the loss offset L_o, normalized loss = loss + L_o,
    embedding bits per byte b_e and total bits per byte = bpb + b_e. For autoencoders also the
    information ratio I_e = 1 − H/9.03 (``information_ratio``) and 1 − H/ln V
    (``information_ratio_exact``), with H the loss in nats per token.
    """
    out = {}
    n_p = stored_numbers(model_cfg)
    if n_p:
        b_p = float(_field(model_cfg, "embed_bits") if bits is None else bits)
        acc = embedding_accounting(sums, n_p, b_p, sequences)
        out.update({k: acc[k] for k in ("loss_offset", "normalized_loss", "embedding_bpb", "total_bpb")})
    if _field(model_cfg, "kind") == "autoencoder":
        loss = float(sums["nll"]) / max(float(sums["tokens"]), 1.0)
        out["information_ratio"] = information_ratio(loss)
        out["information_ratio_exact"] = information_ratio_exact(loss, int(_field(model_cfg, "vocab_size")))
    return out


def log_eval(writer, log, step: int, evals: dict[str, dict[str, float]]) -> None:
    """eval/loss, eval/accuracy, eval/bpb for the first objective; eval/<name>/... for all."""
    first = next(iter(evals))
    scalars = {f"eval/{k}": evals[first][k] for k in ("loss", "accuracy", "bpb")}
    for name, ev in evals.items():
        scalars.update({f"eval/{name}/{k}": v for k, v in ev.items() if k not in ("tokens", "bytes")})
    writer.scalars(step, scalars)
    for name, ev in evals.items():
        label = f"eval {name} @ {step}" if len(evals) > 1 else f"eval @ {step}"
        extra = "".join(f" | {k} {v:.4f}" for k, v in ev.items()
                        if k.endswith("accuracy") and k != "accuracy"
                        or k in ("normalized_loss", "total_bpb", "information_ratio"))
        log(f"{label}: loss {ev['loss']:.4f} | accuracy {ev['accuracy']:.4f} | "
            f"bits/byte {ev['bpb']:.4f}{extra}")


def results_table(evals: dict[str, dict[str, float]], compressors: dict[str, float]) -> str:
    """The final evaluation as a small text table (one row per objective) and the compressors."""
    extras = [k for k in ("copy_accuracy", "normalized_loss", "total_bpb", "information_ratio")
              if any(k in ev for ev in evals.values())]
    lines = [f"{'objective':<12} {'loss':>8} {'accuracy':>9} {'bits/byte':>10}"
             + "".join(f" {k:>17}" for k in extras)]
    for name, ev in evals.items():
        lines.append(f"{name:<12} {ev['loss']:>8.4f} {ev['accuracy']:>9.4f} {ev['bpb']:>10.4f}"
                     + "".join(f" {ev.get(k, float('nan')):>17.4f}" for k in extras))
    lines.append("same eval text, bits/byte: " + " | ".join(f"{k} {v:.4f}" for k, v in compressors.items()))
    return "\n".join(lines)


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
    if not data:
        return {}
    n = len(data)
    return {
        "gzip-9": 8.0 * len(gzip.compress(data, compresslevel=9, mtime=0)) / n,
        "bz2-9": 8.0 * len(bz2.compress(data, compresslevel=9)) / n,
        "xz-9e": 8.0 * len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)) / n,
    }
