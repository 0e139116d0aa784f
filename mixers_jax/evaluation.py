"""Evaluation of a trained run (the library of ``python -m mixers_jax.evaluate``).

Works for every model kind and objective: each objective named by ``--objectives`` (default:
``train.eval_objectives``, else ``train.objective``, of the curriculum stage that wrote the
checkpoint) is built with ``steps.build_steps`` and summed over the evaluation rows exactly like the
trainer's evaluation (docs/metrics.md):

* loss = Σ nll / Σ targets (token-weighted over all rows), token accuracy, and bits per byte =
  Σ nll / (ln 2 · Σ UTF-8 bytes of the targets);
* gzip -9, bz2 -9 and xz -9e on *the very same bytes*: the concatenated UTF-8 bytes of the tokens
  the objective counts as targets, taken row by row in position order (a token the objective counts
  k times appears in k layers of the row's text). Which positions are counted is read off the
  objective itself (the gradient of its summed target bytes with respect to the per-token bytes), so
  pads, the untrained first position of a causal row and copy halves are handled for any objective;
  the byte count of this text equals Σ bytes of the loss;
* for kinds that store one embedding per sequence (``metrics.stored_numbers``: autoencoder,
  embedding_clm) the compression accounting of docs/metrics.md#stored-embedding-accounting at
  ``model.embed_bits`` bits per number:
  loss offset, normalized loss, embedding bits per byte and total bits per byte; for autoencoders
  also the information ratio 1 − H/H0 with H0 = 9.03 and with H0 = ln V
  (docs/metrics.md#information-retention-ratio);
* ``--quant``: the same with ``model.embed_quant`` set to each format (none, float16, bfloat16,
  float8_e4m3fn, float8_e5m2, int8; 'all' for every one), accounted at 32 / 16 / 16 / 8 / 8 / 8 bits
  per number (int8's per-vector scale is not counted).

The command (``python -m mixers_jax.evaluate``) describes the data, the batching and the output.
"""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from mixers_jax import matching, metrics, ranking, sharding
from mixers_jax import objectives as objectives_lib
from mixers_jax.config import field, input_length
from mixers_jax.curriculum import eval_objective_names, stage_at, stage_config, stages
from mixers_jax.data import pairs as pairs_lib
from mixers_jax.data import pipeline, sources
from mixers_jax.environment import environment
from mixers_jax.errors import UserError
from mixers_jax.metrics import QUANT_BITS
from mixers_jax.models.embedding import check_embedding_model, embedding_position
from mixers_jax.steps import build_steps, eval_sums
from mixers_jax.target_bytes import PieceBytes, exact_target_text
from mixers_jax.workdir import CONFIG_FILE, load_config, load_run, with_defaults

# --------------------------------------------------------------------------- options


def parse_quants(text: str) -> list[str]:
    """'' -> []; 'all' -> every format; 'float16,int8' -> those (UserError naming an unknown one)."""
    names = [t.strip() for t in str(text or "").split(",") if t.strip()]
    if names == ["all"]:
        return list(QUANT_BITS)
    unknown = [n for n in names if n not in QUANT_BITS]
    if unknown:
        raise UserError(
            f"unknown --quant format {unknown[0]!r}; choose 'all' or from: {', '.join(QUANT_BITS)}"
        )
    return list(dict.fromkeys(names))


def default_objectives(config) -> list[str]:
    """``train.eval_objectives``, else ``(train.objective,)`` (of the curriculum stage that
    ``config.train`` describes)."""
    return list(eval_objective_names(config.train))


def parse_objectives(text: str, config) -> list[str]:
    """Objective names from ``--objectives`` (default from the config); UserError if unknown."""
    names = [t.strip() for t in str(text or "").split(",") if t.strip()] or default_objectives(config)
    for name in names:
        if name not in objectives_lib.OBJECTIVES:
            raise UserError(
                f"unknown objective {name!r}; choose from: {', '.join(sorted(objectives_lib.OBJECTIVES))}"
            )
    return list(dict.fromkeys(names))


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class EvalRows:
    rows: np.ndarray  # int32 [R, L]
    info: dict  # description for the table and the JSON


def _pack_prefix(docs: Sequence[str], tokenizer, length: int, packing: str, max_rows: int,
                 padding: str = "right"):
    """Rows of ``length`` tokens from ``docs``; with ``max_rows`` > 0 tokenizes only the documents
    needed for the first ``max_rows`` rows (a prefix of the documents packs to a prefix of the rows)."""
    token_docs: list[np.ndarray] = []
    for start in range(0, len(docs), 256):
        token_docs.extend(pipeline.tokenize_documents(docs[start:start + 256], tokenizer))
        if max_rows > 0 and pipeline.count_windows(token_docs, n_ctx=length, packing=packing) >= max_rows:
            break
    rows = pipeline.pack_rows(token_docs, n_ctx=length, packing=packing, pad_id=tokenizer.pad_id,
                              padding=padding)
    n_tokens = int(sum(len(d) for d in token_docs))
    return (rows[:max_rows] if max_rows > 0 else rows), len(token_docs), n_tokens


def eval_rows(config, tokenizer, data: str | None = None, max_rows: int = 0,
              data_format: str = "auto", text_field: str = "") -> EvalRows:
    """The evaluation rows: the run's validation split, or every document of ``data``."""
    length = input_length(config.model)
    packing = str(config.data.packing)
    if data:
        data_cfg = ml_collections.ConfigDict({
            "source": data, "format": data_format or "auto",
            "text_field": text_field or config.data.text_field, "max_documents": 0})
        docs = sources.load_documents(data_cfg)
        what = str(data)
    else:
        split = str(field(config.data, "split", "hash"))
        if split == "hash" and float(config.data.val_fraction) <= 0:
            raise UserError("the run has no validation split (data.val_fraction=0); give --data=PATH")
        docs = sources.split_for_config(sources.load_documents(config.data), config.data)[1]
        what = f"validation split of {config.data.source}"
        if not docs:
            raise UserError(f"the {what} is empty; give --data=PATH")
    rows, n_docs, n_tokens = _pack_prefix(docs, tokenizer, length, packing, int(max_rows),
                                          str(field(config.data, "padding", "right")))
    if len(rows) == 0:
        raise UserError(
            f"{what}: {n_tokens} tokens in {n_docs} documents give no row of {length} tokens "
            f"(packing={packing})"
        )
    info = {"source": what, "packing": packing, "row_length": length, "rows": len(rows),
            "documents_read": n_docs, "max_rows": int(max_rows),
            "tokenizer_exact": bool(getattr(tokenizer, "exact", True))}
    return EvalRows(rows.astype(np.int32), info)


RANDOM_DATA = "random"  # --data=random: uniformly random tokens


def random_rows(shape: tuple[int, int], tokenizer, seed: int = 0) -> tuple[np.ndarray, int]:
    """Rows of ``shape`` whose tokens are drawn independently and uniformly from the K ids that
    have text (every id but unk, bos and eos/pad); returns (rows, K). A model that passes no
    information from its input to its prediction cannot beat ln K on them in expectation
    (docs/ablations.md#random-token-evaluation)."""
    ids = np.flatnonzero(np.asarray(tokenizer.token_bytes()) > 0).astype(np.int32)
    ids = ids[ids != tokenizer.pad_id]
    rng = np.random.default_rng(seed)
    return ids[rng.integers(0, len(ids), size=shape)], len(ids)


def random_eval_rows(config, tokenizer, max_rows: int = 0, seed: int = 0) -> EvalRows:
    """As many random rows (:func:`random_rows`) as the run's validation split has rows of
    ``input_length`` tokens (``max_rows`` > 0 caps them)."""
    shape = eval_rows(config, tokenizer, None, max_rows).rows.shape
    rows, k = random_rows(shape, tokenizer, seed)
    vocab = int(config.model.vocab_size)
    info = {"source": f"random tokens (uniform over {k} of {vocab} ids, seed {seed})",
            "packing": "random", "row_length": shape[1], "rows": shape[0], "max_rows": int(max_rows),
            "random_seed": int(seed), "random_ids": k, "ln_v": math.log(vocab),
            "ln_random_ids": math.log(k), "tokenizer_exact": bool(getattr(tokenizer, "exact", True))}
    return EvalRows(rows, info)


def held_out_paragraph(config, min_chars: int = 300) -> str:
    """The first paragraph (text between blank lines) of at least ``min_chars`` characters in the
    run's validation split, else the first validation document: text the model never trained on."""
    docs = sources.split_for_config(sources.load_documents(config.data), config.data)[1]
    if not docs:
        raise UserError(f"the validation split of {config.data.source} is empty; give --text")
    for doc in docs:
        for para in doc.split("\n\n"):
            if len(para.strip()) >= min_chars:
                return para.strip()
    return docs[0].strip()


def make_batches(rows: np.ndarray, tokenizer, batch_size: int) -> list[dict[str, np.ndarray]]:
    """Batches of ``batch_size`` rows (tokens, loss_mask, token_bytes); the last one is filled up with
    pad rows, whose loss mask is 0 everywhere."""
    table = tokenizer.token_bytes()
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        if len(chunk) < batch_size:
            fill = np.full((batch_size - len(chunk), rows.shape[1]), tokenizer.pad_id, np.int32)
            chunk = np.concatenate([chunk, fill])
        out.append(pipeline.finish_batch(chunk, pad_id=tokenizer.pad_id, token_bytes=table))
    return out


# --------------------------------------------------------------------------- evaluation


def _scores(sums: dict, model_cfg, bits: float, sequences: int) -> dict[str, float]:
    """loss, accuracy, bpb (+ prefixed sums, e.g. copy_*) and the compression accounting of a
    stored embedding at ``bits`` bits per number (``metrics.accounting``)."""
    out = metrics.summarize_sums(sums)
    out.update(metrics.accounting(model_cfg, sums, sequences, bits))
    if metrics.stored_numbers(model_cfg) is not None:
        out["bits_per_number"] = float(bits)
    return out


def evaluate_run(
    workdir: str,
    *,
    data: str | None = None,
    max_rows: int = 0,
    quants: str = "",
    objectives: str = "",
    batch_size: int = 0,
    devices: int = 0,
    data_format: str = "auto",
    text_field: str = "",
    step: int | None = None,
    random_seed: int = 0,
) -> dict:
    """Evaluates the latest (or ``step``) checkpoint of ``workdir``; returns the JSON-ready result.
    ``data='random'``: uniformly random tokens in the validation split's shapes
    (:func:`random_eval_rows`, drawn with ``random_seed``)."""
    quant_list = parse_quants(quants)
    if max_rows < 0 or batch_size < 0 or devices < 0:
        raise UserError("--max_rows, --batch_size and --devices must be >= 0")
    all_devices = jax.local_devices()
    if devices > len(all_devices):
        raise UserError(f"--devices={devices}, but only {len(all_devices)} are available")
    run = load_run(workdir, step)  # its config already holds every field at its default
    # The train settings (objective, copy pass, eval objectives) of the stage that wrote the checkpoint.
    stage = stage_at(stages(run.config), run.step)
    config = stage_config(run.config, stage)
    names = parse_objectives(objectives, config)
    tok = run.tokenizer

    devs = all_devices[: devices or len(all_devices)]
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devs)
    n_dev = sharding.batch_divisor(mesh)
    batch = batch_size or int(config.train.batch_size)
    batch = -(-batch // n_dev) * n_dev  # a multiple of the data-parallel size
    config.train.batch_size, config.train.grad_accum = batch, 1
    rules = sharding.PRESETS["dp"]["rules"]

    matcher = str(config.model.kind) == "matcher"  # pools of frozen embeddings (held-out pairs), not token rows
    if matcher:
        if data:
            raise UserError("--data does not apply to a matcher: it is evaluated on the held-out "
                            "pairs of its config (retrieval.pairs)")
        batches, data_info = matching.evaluation_batches(config, run.workdir, batch, int(max_rows))
    else:
        if data == RANDOM_DATA:
            data_rows = random_eval_rows(config, tok, max_rows, random_seed)
        else:
            data_rows = eval_rows(config, tok, data, max_rows, data_format, text_field)
        batches = make_batches(data_rows.rows, tok, batch)
        data_info = data_rows.info
    stored = metrics.stored_numbers(config.model)
    bits = float(config.model.embed_bits)
    table = PieceBytes.from_tokenizer(tok)
    kind = str(config.model.kind)

    result: dict[str, Any] = {
        "workdir": run.workdir, "step": run.step, "config_name": str(config.name), "model_kind": kind,
        "stage": stage.name,
        "data": dict(data_info, batch_size=batch, batches=len(batches)),
        "environment": dict(environment(), eval_devices=len(devs)),
        "stored_numbers": stored, "embed_bits": bits if stored is not None else None,
        "embed_quant": str(config.model.embed_quant), "objectives": {},
    }
    if quant_list and stored is None:
        result["quant_skipped"] = (f"--quant skipped: model.kind {kind!r} stores no embedding per "
                                   "sequence, so there is nothing to quantize")
        quant_list = []

    params = None
    for name in names:
        steps = build_steps(config, mesh, objective=name, rules=rules, pad_id=tok.pad_id)
        if params is None:
            params = jax.device_put(run.params, steps.state_shardings.params)
        sums, _ = eval_sums(steps, params, batches)
        if matcher:  # no text is predicted: no compressors on target bytes
            result["objectives"][name] = dict(metrics.summarize_sums(sums), pool=data_info["pool"])
            continue
        text, exact, sequences = exact_target_text(config, name, tok.pad_id, batches, table,
                                                    sums["bytes"])
        rec = _scores(sums, config.model, bits, sequences)
        rec.update(sequences=sequences, compressors=metrics.compressor_bpb(text),
                   compressor_bytes=len(text), compressor_text_exact=bool(exact))
        if kind == "autoencoder":
            rec["h0"] = metrics.H0_PUBLISHED
            rec["h0_exact"] = math.log(int(config.model.vocab_size))
        if quant_list:
            rec["quant"] = {}
            for q in quant_list:
                qcfg = with_defaults(config)
                qcfg.model.embed_quant = q
                qsteps = build_steps(qcfg, mesh, objective=name, rules=rules, pad_id=tok.pad_id)
                qsums, _ = eval_sums(qsteps, params, batches)
                rec["quant"][q] = _scores(qsums, qcfg.model, QUANT_BITS[q], sequences)
        result["objectives"][name] = rec
    return result


# --------------------------------------------------------------------------- output


def format_table(result: dict) -> str:
    """The human-readable report of :func:`evaluate_run`'s result (``metrics.results_table`` and
    the quantization sweep)."""
    d = result["data"]
    lines = [
        f"{result['workdir']} @ step {result['step']} ({result['config_name']}, {result['model_kind']})",
        f"data: {d['source']} (packing {d['packing']}): {d['rows']} rows x {d['row_length']} tokens",
        "",
        metrics.results_table(result["objectives"]),
    ]
    stored = result.get("stored_numbers")
    if stored is not None:
        lines += [(f"stored embedding: {stored} numbers per sequence at {result['embed_bits']:g} "
                   "bits (model.embed_bits); docs/metrics.md#stored-embedding-accounting")]
        if any("quant" in r for r in result["objectives"].values()):
            lines += ["", "quantized embedding (model.embed_quant):",
                      (f"{'objective':<12}{'quant':>14}{'bits':>6}{'loss':>10}{'bits/byte':>10}"
                       f"{'norm_loss':>10}{'total_bpb':>10}")]
            for name, r in result["objectives"].items():
                for q, s in r.get("quant", {}).items():
                    lines.append(f"{name:<12}{q:>14}{int(s['bits_per_number']):>6}"
                                 + "".join(metrics.format_cell(s[k]) for k in
                                           ("loss", "bpb", "normalized_loss", "total_bpb")))
    if result.get("quant_skipped"):
        lines += ["", result["quant_skipped"]]
    if "ln_v" in d:
        lines += ["", *random_token_verdicts(result)]
    return "\n".join(lines)


def random_token_verdicts(result: dict) -> list[str]:
    """One line per objective of a random-token evaluation: its loss against ln V and ln K (the
    entropy of the random tokens); below ln K the model carries its input into its prediction,
    i.e. it encodes (some of) any token sequence, not only text."""
    d = result["data"]
    out = []
    for name, r in result["objectives"].items():
        loss = float(r["loss"])
        verdict = ("above ln V" if loss > d["ln_v"] else "below ln V" if loss > d["ln_random_ids"]
                   else "below ln K: the model reproduces random input (a trivial encoding)")
        out.append(f"random tokens, {name}: loss {loss:.4f} vs ln V = {d['ln_v']:.4f} "
                   f"(ln K = {d['ln_random_ids']:.4f}, K = {d['random_ids']} ids drawn): {verdict}")
    return out


def json_ready(obj):
    """Non-finite floats become null (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def non_finite_losses(result: dict) -> list[str]:
    """Names of the objectives (and quant formats) whose evaluation loss is NaN or infinite."""
    def broken(v) -> bool:
        return isinstance(v, float) and not math.isfinite(v)

    bad = []
    for name, r in result["objectives"].items():
        if broken(r["loss"]):
            bad.append(name)
        bad += [f"{name}/{q}" for q, s in r.get("quant", {}).items() if broken(s["loss"])]
    return bad


# --------------------------------------------------------------------------- retrieval


def tuned_on_pairs(workdir: str) -> bool:
    """True when the run in ``workdir`` trained its last stage with a pair objective ('infonce');
    False when it holds no config (the evaluation then reports what is missing)."""
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        return False
    config = load_config(workdir)
    return str(stages(config)[-1].train.objective) in objectives_lib.PAIR_OBJECTIVES


def parse_pool_sizes(text: str) -> tuple[int, ...]:
    """'32,128' -> (32, 128); '' -> () (the default pools); UserError for a non-integer."""
    try:
        return tuple(int(t) for t in str(text or "").split(",") if t.strip())
    except ValueError:
        raise UserError(f"--pool_sizes must be a comma list of integers, got {text!r}") from None


def evaluate_retrieval(workdir: str, *, pairs: str = "", pool_sizes: str = "", queries: int = 0,
                       padding: str = "", position: int = 0, held_out_fraction: float = 0.0,
                       batch_size: int = 0, step: int | None = None, bm25: bool = True) -> dict:
    """Top-1 accuracy of the run's embeddings over pools of held-out pairs, and BM25 on the same
    pools (:mod:`mixers_jax.ranking`). The pairs, split, padding and position are the run's
    ``retrieval.*`` / ``data.padding`` unless given."""
    if queries < 0 or batch_size < 0 or position > 0 or held_out_fraction < 0:
        raise UserError("--queries, --batch_size and --held_out_fraction must be >= 0, "
                        "--position < 0 (or 0: the run's)")
    sizes = parse_pool_sizes(pool_sizes)
    run = load_run(workdir, step)
    config = with_defaults(run.config)
    if pairs:
        config.retrieval.pairs = pairs
    if held_out_fraction:
        config.retrieval.held_out_fraction = float(held_out_fraction)
    if position:
        config.retrieval.position = int(position)
    if padding:
        config.data.padding = padding
    pad = pipeline.check_padding(str(config.data.padding))
    check_embedding_model(config.model)
    _, held, stats = pairs_lib.load_split_pairs(config.retrieval)
    sizes = pairs_lib.pool_sizes(sizes or tuple(config.retrieval.pool_sizes or ()), len(held))
    rows = pairs_lib.pair_rows(held, run.tokenizer, int(config.model.n_ctx), pad)
    pos = embedding_position(config)
    embed = ranking.row_embedder(run.model, run.params, pos, pad)
    result = ranking.evaluate_pairs(embed, rows, sizes=sizes, queries=queries, seed=int(config.seed),
                                    batch_size=batch_size or 64, pad_id=run.tokenizer.pad_id,
                                    bm25=bm25)
    result.update(workdir=run.workdir, step=run.step, config_name=str(config.name),
                  model_kind=str(config.model.kind), position=pos, padding=pad, pairs=stats,
                  environment=environment())
    return result


def format_retrieval(result: dict) -> str:
    """The report of :func:`evaluate_retrieval`."""
    s = result["pairs"]
    return "\n".join([
        f"{result['workdir']} @ step {result['step']} ({result['config_name']}, "
        f"{result['model_kind']}; embedding at position {result['position']}, "
        f"{result['padding']} padding)",
        f"pairs: {s['source']}: {s['pairs']} kept of {s['pairs_read']} read ({s['empty_pairs']} "
        f"empty, {s['duplicate_pairs']} duplicate pairs, {s['duplicate_passages']} duplicate "
        f"passages, {s['non_utf8_lines']} non-UTF-8 lines skipped); {s['train_pairs']} train, "
        f"{s['held_out_pairs']} held out",
        "",
        ranking.retrieval_table(result, label=result["model_kind"]),
    ])
