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

from mixers_jax.config import field, sub_model_config

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
# Bits per stored number of each ``model.embed_quant`` format in the accounting (int8's per-vector
# scale is not counted).
QUANT_BITS = {
    "none": 32, "float16": 16, "bfloat16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8, "int8": 8,
}


def stored_numbers(model_cfg) -> int | None:
    """Numbers stored per sequence: d_enc // compression for kinds that keep one embedding per
    sequence ('autoencoder', 'embedding_clm'; d_enc is the encoder width); None for other kinds."""
    kind = field(model_cfg, "kind")
    if kind not in STORED_EMBEDDING_KINDS:
        return None
    d_enc = int(sub_model_config(model_cfg, "encoder")["d_model"])
    return d_enc // max(1, int(field(model_cfg, "compression", 1) or 1))


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
        b_p = float(field(model_cfg, "embed_bits") if bits is None else bits)
        acc = embedding_accounting(sums, n_p, b_p, sequences)
        out.update({k: acc[k] for k in ("loss_offset", "normalized_loss", "embedding_bpb", "total_bpb")})
    if field(model_cfg, "kind") == "autoencoder":
        loss = float(sums["nll"]) / max(float(sums["tokens"]), 1.0)
        out["information_ratio"] = information_ratio(loss)
        out["information_ratio_exact"] = information_ratio_exact(loss, int(field(model_cfg, "vocab_size")))
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
        bpb = f" | bits/byte {ev['bpb']:.4f}" if math.isfinite(ev["bpb"]) else ""  # no text: none
        log(f"{label}: loss {ev['loss']:.4f} | accuracy {ev['accuracy']:.4f}{bpb}{extra}")


COMPRESSORS = ("gzip-9", "bz2-9", "xz-9e")  # the names :func:`compressor_bpb` reports


def format_cell(v, width: int = 10, prec: int = 4) -> str:
    """A right-aligned table cell; '-' for a missing or non-finite number."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'-':>{width}}"
    if isinstance(v, float):
        return f"{v:>{width}.{prec}f}"
    return f"{v:>{width}}"


def outcome(results: Mapping) -> str:
    """A run's result in one cell: the final evaluation loss, or "diverged at step N" for a run
    that stopped on a non-finite value (a trainer summary or its results.json)."""
    if results.get("diverged"):
        return f"diverged at step {results['diverged']['step']}"
    return f"{float(results['eval']['loss']):.4f}"


def diverged_table(diverged: Mapping, objective: str) -> str:
    """The results table of a run whose divergence is its result (train.on_divergence=record)."""
    w = max(12, len(objective) + 2)
    return "\n".join([f"{'objective':<{w}}result",
                      f"{objective:<{w}}{outcome({'diverged': diverged})} ({diverged['what']})",
                      f"(last good checkpoint: step {diverged['last_good_step']})"])


def results_table(evals: Mapping[str, Mapping], compressors: Mapping[str, float] | None = None) -> str:
    """The final evaluation as a text table (the trainer's end of training and ``evaluate``).

    ``evals``: {objective: scores} (:func:`summarize_sums` + :func:`accounting`; a ``compressors``
    entry {name: bits per byte} gives that row's compressor columns). One row per objective and per
    prefixed sum (``combined/copy``): loss, accuracy, bits/byte, targets, bytes and the classical
    compressors' bits per byte on the same target bytes (``compressors``: those of the first
    objective's text). Scores with the stored-embedding accounting add a second table (sequences,
    loss offset, normalized loss, embedding and total bits per byte) and the information ratios.
    """
    rows = []  # (label, scores, compressors)
    for i, (name, ev) in enumerate(evals.items()):
        comp = ev.get("compressors") or (compressors if i == 0 else None) or {}
        rows.append((name, ev, comp))
        # Sums an objective reports under a prefix (the copy pass of 'combined': copy_loss, ...).
        for p in sorted(k[:-5] for k in ev if k.endswith("_loss") and k != "normalized_loss"):
            if all(f"{p}_{m}" in ev for m in ("accuracy", "bpb", "tokens", "bytes")):
                rows.append((f"{name}/{p}", {m: ev[f"{p}_{m}"] for m in
                                             ("loss", "accuracy", "bpb", "tokens", "bytes")}, {}))
    w = max([12] + [len(row[0]) + 2 for row in rows])
    lines = [f"{'objective':<{w}}" + "".join(
        f"{h:>10}" for h in ["loss", "accuracy", "bits/byte", "targets", "bytes", *COMPRESSORS])]
    for label, ev, comp in rows:
        lines.append(f"{label:<{w}}{format_cell(ev['loss'])}{format_cell(ev['accuracy'])}{format_cell(ev['bpb'])}"
                     f"{format_cell(int(ev['tokens']))}{format_cell(int(ev['bytes']))}"
                     + "".join(format_cell(comp.get(c)) for c in COMPRESSORS))
    lines.append("(compressors: bits per byte on the same target bytes)")
    stored = {name: ev for name, ev in evals.items() if "total_bpb" in ev}
    if stored:
        lines += ["", (f"{'objective':<{w}}{'sequences':>10}{'loss_off':>10}{'norm_loss':>10}"
                       f"{'emb_bpb':>10}{'total_bpb':>10}")]
        for name, ev in stored.items():
            lines.append(f"{name:<{w}}{format_cell(ev.get('sequences'))}{format_cell(ev['loss_offset'])}"
                         f"{format_cell(ev['normalized_loss'])}{format_cell(ev['embedding_bpb'])}"
                         f"{format_cell(ev['total_bpb'])}")
    for name, ev in evals.items():
        if "information_ratio" in ev:
            exact = f" = {ev['h0_exact']:.4f}" if "h0_exact" in ev else ""
            lines.append(f"{name}: information ratio 1 - H/H0 = {ev['information_ratio']:.4f} "
                         f"(H0 = {ev.get('h0', H0_PUBLISHED):g}), "
                         f"{ev['information_ratio_exact']:.4f} (H0 = ln V{exact})")
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
            if name.endswith("bpb") and not math.isfinite(float(value)):
                continue  # undefined: an objective without target bytes (e.g. infonce)
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
