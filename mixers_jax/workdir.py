"""The workdir of a training run: its on-disk format, and loading a trained run from it.

A workdir written by ``trainer.run`` holds

* ``config.json``      the config the run is using now, rewritten at every start and resume
  (:func:`write_config`; read back on top of today's defaults by :func:`load_config`, so a workdir
  from before a new field still loads);
* ``history.jsonl``    one JSON line per start or resume (:func:`record_start`): time, host, pid,
  start step, command line and the settings changed since the previous start;
* ``tokenizer.model``  the sentencepiece model the run reads text with (also in every checkpoint);
  a workdir imported from Hugging Face (docs/hf_import.md) has ``tokenizer.json`` instead;
* ``checkpoints/<step>/`` the items params / opt_state / data / meta (:mod:`mixers_jax.checkpoint`);
* ``run.lock``         held by the training run while it is live (:mod:`mixers_jax.lock`);
* ``log.txt``          the progress lines (:class:`Log`); ``tb/`` the tensorboard scalars;
* ``results.json``     the final evaluation, or the divergence that stopped the run
  (:func:`write_results`); ``profile/`` an optional trace.

:func:`load_run` rebuilds the model from the config and restores the newest intact checkpoint's
params onto one device (whatever mesh the run trained on), without an optimizer. It never writes
and never takes the lock; while a run is live it reads the newest *complete* checkpoint only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import socket
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax.config import base_config
from mixers_jax.curriculum import Stage, init_sources
from mixers_jax.data.tokenizer import Tokenizer
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic
from mixers_jax.lock import live_run
from mixers_jax.models import build_model, example_input

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"
TOKENIZER_FILE = "tokenizer.model"
TOKENIZER_JSON = "tokenizer.json"  # an imported Hugging Face tokenizer (docs/hf_import.md)
RESULTS_FILE = "results.json"
LOG_FILE = "log.txt"
CHECKPOINTS_DIR = "checkpoints"
TB_DIR = "tb"
PROFILE_DIR = "profile"


# --------------------------------------------------------------------------- config


def with_defaults(saved) -> ml_collections.ConfigDict:
    """A saved config (dict or ConfigDict) with every field added to the schema since then at its
    default value (a workdir from an older version still loads); always a new, unlocked copy."""

    def merge(base: dict, over: dict) -> dict:
        out = dict(base)
        for k, v in over.items():
            out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
        return out

    saved = saved.to_dict() if hasattr(saved, "to_dict") else dict(saved)
    return ml_collections.ConfigDict(merge(base_config().to_dict(), saved))


def _read_saved(workdir: str) -> dict | None:
    """The JSON of ``workdir/config.json``; None if there is none."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The run's config on top of today's defaults; UserError if ``workdir`` has none."""
    saved = _read_saved(workdir)
    if saved is None:
        raise UserError(f"{workdir} is not a training workdir (no {CONFIG_FILE})")
    return with_defaults(saved)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_is_folder(workdir: str) -> None:
    """UserError when ``workdir`` exists but is not a folder (nothing could be written into it)."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} is a file, not a folder")


# Model settings that choose how the same function is computed, not what it is (the parameters
# and the values up to float reassociation stay): a resume may change them.
MODEL_FREE_ON_RESUME = ("model.mixing_impl",)


def check_workdir_compatible(config, workdir: str) -> bool:
    """True when ``workdir`` holds an earlier run of this model; raises if it holds another model
    (a field added to the schema after the workdir was made counts as its default value; the
    settings of :data:`MODEL_FREE_ON_RESUME` may differ)."""
    check_is_folder(workdir)
    if _read_saved(workdir) is None:
        return False
    diff = [c for c in config_changes(workdir, config)
            if c[0].startswith("model.") and c[0] not in MODEL_FREE_ON_RESUME]
    if diff:
        shown = ", ".join(f"{k}={old!r} (saved) vs {new!r}" for k, old, new in diff[:3])
        raise UserError(
            f"workdir {workdir} holds a different model ({shown}); use another --workdir"
        )
    return True


# Settings a resumed run may not change (a key, or a section ending in '.'): the data iterator's
# saved state (which rows come next) only means the same thing for the same documents, split,
# packing, tokenizer, shuffle seed and batch size; the saved optimizer state has the structure that
# the frozen groups and the stages give it.
FIXED_ON_RESUME = ("data.", "seed", "train.batch_size", "train.frozen", "train.stages",
                   "train.frozen_encoder_embedding", "retrieval.pairs", "retrieval.query_field",
                   "retrieval.passage_field", "retrieval.held_out_fraction", "retrieval.max_pairs")


def _fixed_on_resume(key: str) -> bool:
    return any(key.startswith(f) if f.endswith(".") else key == f for f in FIXED_ON_RESUME)


def config_changes(workdir: str, config) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every setting of ``config`` that differs from the
    workdir's ``config.json`` (a field added to the schema since counts as its default); [] when
    there is no saved config."""
    saved = _read_saved(workdir)
    if saved is None:
        return []
    def as_json(cfg) -> dict:  # as config.json holds it (tuples are lists there)
        return _flatten(json.loads(json.dumps(cfg.to_dict())))

    old, new = as_json(with_defaults(saved)), as_json(config)
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def check_resume_changes(workdir: str, changes: list[tuple[str, Any, Any]]) -> None:
    """UserError when ``changes`` touch a setting of :data:`FIXED_ON_RESUME`."""
    fixed = [c for c in changes if _fixed_on_resume(c[0])]
    if fixed:
        shown = ", ".join(f"{k}={old!r} (saved) vs {new!r}" for k, old, new in fixed[:3])
        raise UserError(f"workdir {workdir} was trained with other settings ({shown}); data.*, seed, "
                        "train.batch_size, train.frozen, train.stages and the retrieval pairs (with "
                        "their split) cannot change on resume (the "
                        "saved data order and optimizer state would no longer match); use another "
                        "--workdir")


def check_resume_length(workdir: str, latest_step: int, total_steps: int) -> None:
    """UserError when the workdir's newest checkpoint lies beyond the run's last step (train.steps
    or the stages were shortened): the run would have nothing to train and no stage to resume."""
    if latest_step > total_steps:
        raise UserError(f"workdir {workdir} holds a checkpoint at step {latest_step}, beyond this "
                        f"run's {total_steps} steps; give at least that many steps or another "
                        "--workdir")


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


# --------------------------------------------------------------------------- writing


def _write_json_atomic(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_config(workdir: str, config) -> None:
    _write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def write_results(workdir: str, results: dict) -> None:
    _write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)


def record_start(workdir: str, start_step: int, changes: list[tuple[str, Any, Any]]) -> None:
    """Appends one line to ``history.jsonl``: who started the run when, at which step, with which
    command line, and the settings changed since the previous start."""
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start_step": int(start_step),
        "argv": list(sys.argv[1:]),
        "changed": {k: [old, new] for k, old, new in changes},
    }
    with open(os.path.join(workdir, HISTORY_FILE), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True, default=repr) + "\n")


class Log:
    """Progress lines to stdout (process 0 only) and to ``workdir/log.txt``."""

    def __init__(self, workdir: str, enabled: bool):
        self.enabled = enabled
        self._file = open(os.path.join(workdir, LOG_FILE), "a", encoding="utf-8") if enabled else None

    def __call__(self, line: str) -> None:
        if self.enabled:
            print(line, flush=True)
            self._file.write(line + "\n")
            self._file.flush()

    def close(self):
        if self._file:
            self._file.close()


# --------------------------------------------------------------------------- reading a trained run


@dataclasses.dataclass
class Run:
    workdir: str
    config: ml_collections.ConfigDict
    model: Any
    params: Any
    tokenizer: Any
    step: int

    def fingerprint(self) -> bytes:
        """16-byte hash of the params (names, shapes, dtypes, values), the tokenizer model and the
        model config: the identity of what drives generation and compression."""
        return fingerprint(self.params, self.tokenizer.serialized(), self.config.model.to_dict())


def fingerprint(params: Any, tokenizer_proto: bytes, model_cfg: dict) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps(model_cfg, sort_keys=True).encode())
    h.update(hashlib.sha256(tokenizer_proto).digest())
    for path, leaf in sorted(
        jax.tree_util.tree_leaves_with_path(params), key=lambda kv: jax.tree_util.keystr(kv[0])
    ):
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(str((arr.shape, arr.dtype.str)).encode())
        h.update(arr.tobytes())
    return h.digest()


def abstract_params(model_cfg, model=None) -> Any:
    """The parameter tree of ``model_cfg`` as ShapeDtypeStructs (unboxed; no array is made)."""
    model = model or build_model(model_cfg)
    shapes = jax.eval_shape(
        lambda r: model.init(r, example_input(model_cfg))["params"], jax.random.key(0))
    return nn.meta.unbox(shapes)


def tokenizer_file(workdir: str) -> str:
    """The workdir's tokenizer file: ``tokenizer.model``, else an existing ``tokenizer.json``."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    json_path = os.path.join(workdir, TOKENIZER_JSON)
    return json_path if not os.path.exists(path) and os.path.exists(json_path) else path


def _config_and_tokenizer(workdir: str) -> tuple[str, ml_collections.ConfigDict, Tokenizer]:
    """(absolute workdir, config, tokenizer) of a workdir; ``UserError`` if either is missing."""
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} does not exist")
    config = load_config(workdir)
    tok_path = tokenizer_file(workdir)
    if os.path.exists(tok_path):
        tokenizer = Tokenizer.load(tok_path)
    else:  # a run that read text with another run's tokenizer (init_from): the checkpoint's copy
        saved = checkpoint_tokenizer(workdir)
        if saved is None:
            raise UserError(f"{workdir} has no {TOKENIZER_FILE}")
        tokenizer = Tokenizer.from_serialized(saved[1])
    return workdir, config, tokenizer


def load_untrained(workdir: str) -> Run:
    """The run of ``workdir`` with fresh parameters of its config instead of a checkpoint, drawn
    from its ``seed`` as training draws them (step 0; the checkpoints are not read)."""
    workdir, config, tokenizer = _config_and_tokenizer(workdir)
    model = build_model(config.model)
    params = nn.meta.unbox(
        model.init(jax.random.key(int(config.seed)), example_input(config.model))["params"])
    return Run(workdir, config, model, params, tokenizer, 0)


def load_run(workdir: str, step: int | None = None) -> Run:
    """(config, model, params, tokenizer) of the newest intact (or the given) checkpoint in
    ``workdir``, on one device. Reads only: no lock, no write; a damaged newer checkpoint is
    reported and skipped; while a run is live there, only complete checkpoints are read."""
    workdir, config, tokenizer = _config_and_tokenizer(workdir)
    model = build_model(config.model)
    ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{workdir} has no {CHECKPOINTS_DIR}/")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            abstract_params(config.model, model))
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
        if step is None:
            live = live_run(workdir) is not None
            found = checkpointer.restore_latest(
                lambda s: checkpointer.restore_params(s, abstract), complete_only=live)
            if found is None:
                raise UserError(f"{workdir} has no {'complete ' if live else ''}checkpoint yet")
            step, params = found
        else:
            params = checkpointer.restore_params(int(step), abstract)
    finally:
        checkpointer.close()
    return Run(workdir, config, model, params, tokenizer, int(step))


def checkpoint_tokenizer(workdir: str) -> tuple[int, bytes] | None:
    """(step, serialized tokenizer) from the meta of the checkpoint a resume restores (the newest
    intact one, with the same fallback); None without a checkpoint (or one from a version that did
    not store it). Reads only."""
    ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        return None
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True, log=lambda _: None)
    try:
        found = checkpointer.restore_latest(checkpointer.restore_meta)
        if found is None:
            return None
        step, meta = found
        blob = meta.get("tokenizer")
    finally:
        checkpointer.close()
    return (step, ckpt_lib.decode_bytes(blob)) if blob else None


def resume_tokenizer(config, workdir: str) -> Tokenizer | None:
    """The tokenizer check of a resumed run, before anything is written.

    The tokenizer the data pipeline would use (``data.tokenizer_model``, else the workdir's
    ``tokenizer.model``) must be the one the checkpoint was trained with (same serialized model):
    UserError otherwise. When neither exists (the workdir's file was deleted), the checkpoint's
    tokenizer is returned, to be used and written back instead of training a new one; else None.
    """
    saved = checkpoint_tokenizer(workdir)
    if saved is None:
        return None
    step, blob = saved
    configured = str(config.data.tokenizer_model or "")
    path = configured or tokenizer_file(workdir)
    if not os.path.isfile(path):
        if configured:
            return None  # build_data reports the missing file
        return Tokenizer.from_serialized(blob)
    current = Tokenizer.load(path).serialized()
    if current != blob:
        digest = lambda b: hashlib.sha256(b).hexdigest()[:12]  # noqa: E731
        raise UserError(
            f"tokenizer {path} (sha256 {digest(current)}...) is not the one checkpoint {step} in "
            f"{os.path.join(workdir, CHECKPOINTS_DIR)} was trained with (sha256 {digest(blob)}...); "
            "resume with the same tokenizer or use another --workdir")
    return None


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in ``workdir`` ([] without a checkpoints/ folder)."""
    ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        return []
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, read_only=True)
    try:
        return sorted(checkpointer.all_steps())
    finally:
        checkpointer.close()


def init_source(stage: Stage, abstract: bool = False) -> tuple[Any, ml_collections.ConfigDict]:
    """(params, config) of the latest checkpoint in the stage's ``train.init_from`` workdir; with
    ``abstract`` the parameter shapes only, built from its config (no array is loaded), after
    checking that the workdir holds a checkpoint."""
    path = os.path.abspath(str(stage.train.init_from))
    if abstract:
        if not os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
            raise UserError(f"train.init_from {path} is not a trained workdir (no {CHECKPOINTS_DIR}/)")
        if not checkpoint_steps(path):
            raise UserError(f"train.init_from {path} has no checkpoint yet ({CHECKPOINTS_DIR}/ is empty)")
        cfg = load_config(path)
        return abstract_params(cfg.model), cfg
    run = load_run(path)
    return jax.device_get(run.params), run.config


def with_init_tokenizer(config, stage_list: list[Stage]):
    """A run that loads trained parameters must read text with the same tokenizer: when
    ``data.tokenizer_model`` is empty, the first init_from workdir's tokenizer is used."""
    sources = init_sources(stage_list)
    if not sources or str(config.data.tokenizer_model):
        return config
    path = tokenizer_file(os.path.abspath(sources[0]))
    if not os.path.exists(path):
        raise UserError(f"train.init_from {sources[0]} has no {TOKENIZER_FILE}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.tokenizer_model = path
    c.lock()
    return c
