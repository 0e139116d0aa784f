"""The workdir of a training run: its on-disk format, and loading a trained run from it.

A workdir written by ``trainer.run`` holds

* ``config.json``      the run's config (:func:`write_config`; read back on top of today's defaults
  by :func:`load_config`, so a workdir from before a new field still loads);
* ``tokenizer.model``  the sentencepiece model the run reads text with;
* ``checkpoints/<step>/`` orbax items state/data/meta (the state is ``steps.TrainState``);
* ``log.txt``          the progress lines (:class:`Log`); ``tb/`` the tensorboard scalars;
* ``results.json``     the final evaluation (:func:`write_results`); ``profile/`` an optional trace.

:func:`load_run` rebuilds the model from the config and restores the latest checkpoint's params onto
one device (whatever mesh the run trained on).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax.config import base_config, input_length
from mixers_jax.curriculum import Stage, init_sources, param_labels, stage_at, stages
from mixers_jax.data.tokenizer import Tokenizer
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic
from mixers_jax.models import build_model
from mixers_jax.steps import TrainState, make_optimizer

CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"
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


def check_workdir_compatible(config, workdir: str) -> bool:
    """True when ``workdir`` holds an earlier run of this model; raises if it holds another model
    (a field added to the schema after the workdir was made counts as its default value)."""
    check_is_folder(workdir)
    saved = _read_saved(workdir)
    if saved is None:
        return False
    old = _flatten(with_defaults({"model": saved.get("model", {})}).model.to_dict(), "model.")
    new = _flatten(config.model.to_dict(), "model.")
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        shown = ", ".join(f"{k}={old.get(k)!r} (saved) vs {new.get(k)!r}" for k in diff[:3])
        raise UserError(
            f"workdir {workdir} holds a different model ({shown}); use another --workdir"
        )
    return True


# --------------------------------------------------------------------------- writing


def _write_json_atomic(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def write_config(workdir: str, config) -> None:
    _write_json_atomic(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def write_results(workdir: str, results: dict) -> None:
    _write_json_atomic(os.path.join(workdir, RESULTS_FILE), results)


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


def load_run(workdir: str, step: int | None = None) -> Run:
    """(config, model, params, tokenizer) of the latest (or given) checkpoint in ``workdir``."""
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise UserError(f"workdir {workdir} does not exist")
    config = load_config(workdir)
    tok_path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(tok_path):
        raise UserError(f"{workdir} has no {TOKENIZER_FILE}")
    tokenizer = Tokenizer.load(tok_path)
    model = build_model(config.model)
    ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        raise UserError(f"{workdir} has no {CHECKPOINTS_DIR}/")
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=10**6)
    try:
        steps = checkpointer.all_steps()
        if not steps:
            raise UserError(f"{workdir} has no checkpoint yet")
        if step is None:
            step = max(steps)
        elif step not in steps:
            raise UserError(f"{workdir} has no checkpoint at step {step} (has {sorted(steps)})")
        # The optimizer state's structure is that of the stage that wrote the checkpoint.
        stage = stage_at(stages(config), step)
        n_in = input_length(config.model)

        def init_params(rng):
            return model.init(rng, jnp.zeros((1, n_in), jnp.int32))["params"]

        labels = param_labels(nn.meta.unbox(jax.eval_shape(init_params, jax.random.key(0))),
                              stage.train)
        tx = make_optimizer(stage.train, stage.start, labels)

        def init(rng):
            params = init_params(rng)
            return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

        abstract = nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
        )
        try:
            state, _, _ = checkpointer.restore(step, abstract)
        except Exception as e:  # noqa: BLE001 - orbax raises many kinds; report one line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot restore {ckpt_dir}/{step}: {first}") from None
    finally:
        checkpointer.close()
    return Run(workdir, config, model, state.params, tokenizer, int(step))


def checkpoint_steps(workdir: str) -> list[int]:
    """The steps of the checkpoints in ``workdir`` ([] without a checkpoints/ folder)."""
    ckpt_dir = os.path.join(workdir, CHECKPOINTS_DIR)
    if not os.path.isdir(ckpt_dir):
        return []
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep=10**6)
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
        model = build_model(cfg.model)
        shapes = jax.eval_shape(
            lambda r: model.init(r, jnp.zeros((1, input_length(cfg.model)), jnp.int32))["params"],
            jax.random.key(0))
        return nn.meta.unbox(shapes), cfg
    run = load_run(path)
    return jax.device_get(run.params), run.config


def with_init_tokenizer(config, stage_list: list[Stage]):
    """A run that loads trained parameters must read text with the same tokenizer: when
    ``data.tokenizer_model`` is empty, the first init_from workdir's tokenizer is used."""
    sources = init_sources(stage_list)
    if not sources or str(config.data.tokenizer_model):
        return config
    path = os.path.join(os.path.abspath(sources[0]), TOKENIZER_FILE)
    if not os.path.exists(path):
        raise UserError(f"train.init_from {sources[0]} has no {TOKENIZER_FILE}")
    c = ml_collections.ConfigDict(config.to_dict())
    c.data.tokenizer_model = path
    c.lock()
    return c
