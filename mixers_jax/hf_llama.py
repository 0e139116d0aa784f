"""Hugging Face Llama checkpoints <-> the transformer (docs/hf_import.md).

A checkpoint directory holds ``config.json`` and the weights in safetensors files: one
``model.safetensors``, or shards listed by ``model.safetensors.index.json`` (tensor -> file). Import
(:func:`load_llama`) checks everything first (the architecture, every tensor's presence and shape
against config.json, every shard file), then reads tensor by tensor: each parameter is made with
``jax.make_array_from_callback`` on its target sharding, and the callback reads from the file only
the slice one device holds (``safe_open(...).get_slice``), so a sharded import never holds a whole
parameter, let alone the model, on one device. Export (:func:`save_llama`) writes the same layout.

Tensor layout (HF Linear weights are [out, in]; G key/value heads, hd the head width, F the SwiGLU
width; the table in models/transformer.py):

    q_proj [H·hd, d] -> q/kernel [d, H, hd]      = Wᵀ.reshape(d, H, hd)
    k_proj, v_proj [G·hd, d] -> [d, G, hd]
    o_proj [d, H·hd] -> o/kernel [H, hd, d]      = Wᵀ.reshape(H, hd, d)
    gate_proj, up_proj [F, d] -> [d, F];  down_proj [d, F] -> [F, d];  lm_head [V, d] -> [d, V]
    embed_tokens [V, d], the RMSNorm weights [d]: as they are

Parameters are float32 whatever the file's dtype (float32/bfloat16/float16 read exactly); export
writes float32 by default (an export -> import round trip is bit-exact) or bfloat16/float16.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import safetensors.numpy
from safetensors import safe_open

from mixers_jax import checkpoint as ckpt_lib
from mixers_jax import sharding as sharding_lib
from mixers_jax import workdir as workdir_lib
from mixers_jax.config import base_config, field
from mixers_jax.data.tokenizer import Tokenizer
from mixers_jax.data.tokenizer_json import byte_level_chars, looks_like_json
from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic
from mixers_jax.lock import WorkdirLock
from mixers_jax.models import build_model, example_input

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_JSON = "tokenizer.json"
LLAMA_TYPES = ("llama",)
# Tensors a Llama checkpoint may hold that the model does not need (RoPE tables of old exports).
IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DEFAULT_SHARD_BYTES = 4 << 30


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} does not exist ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


# --------------------------------------------------------------------------- config.json


def read_hf_config(hf_dir: str) -> dict:
    """``config.json`` of a checkpoint directory; UserError unless it describes a Llama-like model
    (model_type llama, SiLU SwiGLU, no attention or MLP biases)."""
    path = os.path.join(hf_dir, CONFIG_FILE)
    if not os.path.isdir(hf_dir):
        raise UserError(f"checkpoint directory {hf_dir} does not exist")
    hf = _read_json(path, "the checkpoint's config")
    kind = hf.get("model_type")
    if kind not in LLAMA_TYPES:
        arch = ",".join(hf.get("architectures") or []) or "none given"
        raise UserError(f"{path}: model_type {kind!r} (architectures {arch}) is not Llama-like; "
                        f"only {', '.join(LLAMA_TYPES)} checkpoints can be imported")
    for key, want in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if hf.get(key, want) != want:
            raise UserError(f"{path}: {key}={hf[key]!r} is not Llama-like (needs {want!r})")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"):
        if not isinstance(hf.get(key), int) or hf[key] < 1:
            raise UserError(f"{path}: {key} must be a positive integer, got {hf.get(key)!r}")
    return hf


def _rope(hf: dict) -> tuple[float, dict]:
    """(θ, scaling dict or {}) from a transformers-4 (rope_theta, rope_scaling) or -5
    (rope_parameters) config."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    return float(theta), ({} if kind == "default" else dict(scaling, rope_type=kind))


def model_fields(hf: dict, n_ctx: int = 0) -> dict:
    """The ``config.model`` fields of the transformer a Llama ``config.json`` describes
    (``n_ctx`` 0: the checkpoint's max_position_embeddings)."""
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    g = hf.get("num_key_value_heads") or h
    hd = hf.get("head_dim") or d // h
    theta, scaling = _rope(hf)
    out = dict(
        kind="transformer", transformer="llama", vocab_size=hf["vocab_size"],
        n_ctx=int(n_ctx or hf.get("max_position_embeddings") or 2048), d_model=d,
        n_layers=hf["num_hidden_layers"], n_heads=h, n_kv_heads=0 if g == h else g,
        head_dim=0 if hd * h == d else hd, mlp_ratio=4, mlp_hidden=hf["intermediate_size"],
        rms_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), causal=True,
        hybrid="none", mlp="mlp", layer_norm=True, residual=True,
    )
    if scaling:
        kind = scaling["rope_type"]
        if kind not in ("linear", "llama3"):
            raise UserError(f"config.json: rope scaling {kind!r} is not supported (linear, llama3)")
        out.update(rope_scaling=kind, rope_factor=float(scaling["factor"]))
        if kind == "llama3":
            out.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                       rope_high_freq_factor=float(scaling["high_freq_factor"]),
                       rope_original_n_ctx=int(scaling["original_max_position_embeddings"]))
    return out


def hf_config(model_cfg: Any, eos_id: int | None = None, bos_id: int | None = None,
              dtype: str = "float32") -> dict:
    """The ``config.json`` of a Llama transformer's ``config.model`` (inverse of
    :func:`model_fields`); UserError for a model the Llama layout cannot hold."""
    check_exportable(model_cfg)
    d, h = int(field(model_cfg, "d_model")), int(field(model_cfg, "n_heads"))
    scaling = str(field(model_cfg, "rope_scaling", "none"))
    rope = None
    if scaling != "none":
        rope = {"rope_type": scaling, "factor": float(field(model_cfg, "rope_factor"))}
        if scaling == "llama3":
            rope.update(low_freq_factor=float(field(model_cfg, "rope_low_freq_factor")),
                        high_freq_factor=float(field(model_cfg, "rope_high_freq_factor")),
                        original_max_position_embeddings=int(field(model_cfg, "rope_original_n_ctx")))
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": int(field(model_cfg, "vocab_size")), "hidden_size": d,
        "intermediate_size": int(field(model_cfg, "mlp_hidden", 0)
                                 or int(field(model_cfg, "mlp_ratio")) * d),
        "num_hidden_layers": int(field(model_cfg, "n_layers")), "num_attention_heads": h,
        "num_key_value_heads": int(field(model_cfg, "n_kv_heads", 0) or h),
        "head_dim": int(field(model_cfg, "head_dim", 0) or d // h),
        "max_position_embeddings": int(field(model_cfg, "n_ctx")), "hidden_act": "silu",
        "rms_norm_eps": float(field(model_cfg, "rms_eps", 1e-6)),
        "rope_theta": float(field(model_cfg, "rope_theta")), "rope_scaling": rope,
        "tie_word_embeddings": bool(field(model_cfg, "tie_embeddings")),
        "attention_bias": False, "mlp_bias": False, "torch_dtype": dtype,
        "bos_token_id": bos_id if bos_id is not None and bos_id >= 0 else None,
        "eos_token_id": eos_id if eos_id is not None and eos_id >= 0 else None,
    }


def check_exportable(model_cfg: Any) -> None:
    """UserError unless ``model_cfg`` is a plain Llama transformer (one module per block)."""
    want = dict(kind="transformer", transformer="llama", hybrid="none", mlp="mlp", layer_norm=True,
                residual=True, causal=True, scan_layers=False)
    for key, value in want.items():
        if field(model_cfg, key, value) != value:
            raise UserError(f"only a plain Llama transformer has the Hugging Face layout; "
                            f"model.{key}={field(model_cfg, key)!r} (needs {value!r})")


# --------------------------------------------------------------------------- the tensor map


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its path in the parameter tree, the HF tensor name, the HF shape, and how the
    HF tensor becomes the parameter ('same' | 't' transposed | 'in_heads' [X·hd, d] -> [d, X, hd] |
    'out_heads' [d, H·hd] -> [H, hd, d])."""

    path: tuple[str, ...]
    name: str
    hf_shape: tuple[int, ...]
    form: str
    heads: int = 0


def tensor_map(model_cfg: Any) -> list[Entry]:
    """Every parameter of the Llama transformer of ``model_cfg`` and its HF tensor."""
    d, h, V = (int(field(model_cfg, k)) for k in ("d_model", "n_heads", "vocab_size"))
    g = int(field(model_cfg, "n_kv_heads", 0) or h)
    hd = int(field(model_cfg, "head_dim", 0) or d // h)
    F = int(field(model_cfg, "mlp_hidden", 0) or int(field(model_cfg, "mlp_ratio")) * d)
    out = [Entry(("embed", "embedding"), "model.embed_tokens.weight", (V, d), "same")]
    for i in range(int(field(model_cfg, "n_layers"))):
        b, p = f"block_{i}", f"model.layers.{i}."
        out += [
            Entry((b, "attn_norm", "scale"), p + "input_layernorm.weight", (d,), "same"),
            Entry((b, "attn", "q", "kernel"), p + "self_attn.q_proj.weight", (h * hd, d), "in_heads", h),
            Entry((b, "attn", "k", "kernel"), p + "self_attn.k_proj.weight", (g * hd, d), "in_heads", g),
            Entry((b, "attn", "v", "kernel"), p + "self_attn.v_proj.weight", (g * hd, d), "in_heads", g),
            Entry((b, "attn", "o", "kernel"), p + "self_attn.o_proj.weight", (d, h * hd), "out_heads", h),
            Entry((b, "mlp_norm", "scale"), p + "post_attention_layernorm.weight", (d,), "same"),
            Entry((b, "mlp", "gate", "kernel"), p + "mlp.gate_proj.weight", (F, d), "t"),
            Entry((b, "mlp", "up", "kernel"), p + "mlp.up_proj.weight", (F, d), "t"),
            Entry((b, "mlp", "down", "kernel"), p + "mlp.down_proj.weight", (d, F), "t"),
        ]
    out.append(Entry(("final_norm", "scale"), "model.norm.weight", (d,), "same"))
    if not bool(field(model_cfg, "tie_embeddings")):
        out.append(Entry(("head", "kernel"), "lm_head.weight", (V, d), "t"))
    return out


def _bounds(index: tuple, shape: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, stop) of each axis of a device's ``index`` (slices, possibly open) into ``shape``."""
    out = []
    for s, n in zip(tuple(index) + (slice(None),) * (len(shape) - len(index)), shape):
        start, stop, step = s.indices(n)
        assert step == 1
        out.append((start, stop))
    return out


def read_part(entry: Entry, read: Callable[[tuple], np.ndarray], index: tuple,
              shape: tuple[int, ...]) -> np.ndarray:
    """The part ``index`` of the parameter ``entry`` (shape ``shape``) as float32, reading only
    the HF rows/columns it needs through ``read(slices)``."""
    bounds = _bounds(index, shape)
    sl = [slice(a, b) for a, b in bounds]
    if entry.form == "same":
        part = read(tuple(sl))
    elif entry.form == "t":
        part = read((sl[1], sl[0])).T
    elif entry.form == "in_heads":  # param [d, X, hd][a, x, k] = W[x·hd + k, a]
        (d0, d1), (x0, x1), _ = bounds
        hd = shape[2]
        part = read((slice(x0 * hd, x1 * hd), slice(d0, d1))).T.reshape(d1 - d0, x1 - x0, hd)
        part = part[:, :, sl[2]]
    else:  # 'out_heads': param [H, hd, d][x, k, a] = W[a, x·hd + k]
        (x0, x1), _, (d0, d1) = bounds
        hd = shape[1]
        part = read((slice(d0, d1), slice(x0 * hd, x1 * hd))).T.reshape(x1 - x0, hd, d1 - d0)
        part = part[:, sl[1], :]
    return np.ascontiguousarray(part, dtype=np.float32)


def to_hf(entry: Entry, param: np.ndarray) -> np.ndarray:
    """The HF tensor of a whole parameter (inverse of :func:`read_part`)."""
    if entry.form == "same":
        return param
    if entry.form == "t":
        return param.T
    if entry.form == "in_heads":
        return param.reshape(param.shape[0], -1).T
    return param.reshape(-1, param.shape[-1]).T


# --------------------------------------------------------------------------- reading


def weight_files(hf_dir: str) -> dict[str, str]:
    """Tensor name -> safetensors file path; UserError for a missing index, shard or file."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    single = os.path.join(hf_dir, SINGLE_FILE)
    if os.path.exists(index_path):
        index = _read_json(index_path, "the shard index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_path} has no weight_map")
        files = {name: os.path.join(hf_dir, f) for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not os.path.isfile(f):
                names = sorted(n for n, p in files.items() if p == f)
                raise UserError(f"shard {f} listed in {INDEX_FILE} is missing (it holds {names[0]}"
                                f"{f' and {len(names) - 1} more tensors' if len(names) > 1 else ''})")
        return files
    if os.path.isfile(single):
        return {name: single for name in _file_keys(single)}
    raise UserError(f"{hf_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _file_keys(path: str) -> list[str]:
    try:
        with safe_open(path, framework="np") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds for bad files
        raise UserError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]})") from None


class Reader:
    """Open safetensors files of a checkpoint, read lazily by tensor slices."""

    def __init__(self, files: dict[str, str]):
        self.files = files
        self._open: dict[str, Any] = {}

    def handle(self, name: str):
        path = self.files[name]
        if path not in self._open:
            try:
                self._open[path] = safe_open(path, framework="np")
            except Exception as e:  # noqa: BLE001
                raise UserError(f"{path} is not a readable safetensors file "
                                f"({str(e).splitlines()[0]})") from None
        return self._open[path]

    def shape(self, name: str) -> tuple[int, ...]:
        try:
            return tuple(self.handle(name).get_slice(name).get_shape())
        except Exception as e:  # noqa: BLE001 - a name the index lists but the file lacks
            raise UserError(f"tensor {name} is not in {self.files[name]} "
                            f"({str(e).splitlines()[0]})") from None

    def dtype(self, name: str) -> str:
        return str(self.handle(name).get_slice(name).get_dtype())

    def read(self, name: str, slices: tuple) -> np.ndarray:
        return np.asarray(self.handle(name).get_slice(name)[slices])

    def close(self, path: str | None = None) -> None:
        """Unmaps ``path`` (default: every file): its pages stop counting as this process's."""
        for p in [path] if path is not None else list(self._open):
            handle = self._open.pop(p, None)
            if handle is not None and hasattr(handle, "__exit__"):
                handle.__exit__(None, None, None)


def check_tensors(reader: Reader, entries: list[Entry], tied: bool) -> None:
    """UserError naming the tensor (and file) that is missing, unexpected or of the wrong shape or
    dtype; run before anything is placed."""
    wanted = {e.name for e in entries}
    for e in entries:
        if e.name not in reader.files:
            raise UserError(f"tensor {e.name} is missing from the checkpoint "
                            f"({len(reader.files)} tensors in {len(set(reader.files.values()))} "
                            "file(s))")
        shape = reader.shape(e.name)
        if shape != e.hf_shape:
            raise UserError(f"tensor {e.name} in {reader.files[e.name]} has shape {list(shape)}, "
                            f"config.json gives {list(e.hf_shape)}")
        dtype = reader.dtype(e.name)
        if dtype not in ("F32", "BF16", "F16"):
            raise UserError(f"tensor {e.name} in {reader.files[e.name]} has dtype {dtype}; "
                            "float32, bfloat16 or float16 expected")
    for name in sorted(reader.files):
        if name in wanted or IGNORED.match(name) or (tied and name == "lm_head.weight"):
            continue
        raise UserError(f"unexpected tensor {name} in {reader.files[name]}: not part of a Llama "
                        "model of this config.json")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


def target_shardings(model_cfg: Any, mesh=None, rules=sharding_lib.DEFAULT_RULES) -> Any:
    """The NamedSharding of every parameter on ``mesh`` (default: the first device alone)."""
    if mesh is None:
        mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    model = build_model(model_cfg)
    boxed = jax.eval_shape(lambda r: model.init(r, example_input(model_cfg))["params"],
                           jax.random.key(0))
    return sharding_lib.tree_shardings(boxed, mesh, rules), nn.meta.unbox(boxed)


def load_llama(hf_dir: str, *, n_ctx: int = 0, dtype: str = "float32", mesh=None,
               rules=sharding_lib.DEFAULT_RULES) -> tuple[dict, Any]:
    """(model fields, params) of the Llama checkpoint in ``hf_dir``: each parameter placed on its
    sharding on ``mesh`` (default: one device) as it is read, one device slice at a time.

    UserError (before anything is placed) for a config.json that is not Llama-like, a missing shard
    or tensor, an unexpected tensor, a shape that does not match config.json."""
    hf = read_hf_config(hf_dir)
    fields = dict(model_fields(hf, n_ctx), dtype=dtype)
    model_cfg = base_config().model
    model_cfg.update(fields)
    try:
        shardings, abstract = target_shardings(model_cfg, mesh, rules)
    except UserError as e:
        raise UserError(f"{os.path.join(hf_dir, CONFIG_FILE)}: {e}") from None
    entries = tensor_map(model_cfg)
    reader = Reader(weight_files(hf_dir))
    try:
        check_tensors(reader, entries, bool(fields["tie_embeddings"]))
        reader.close()
        # file by file, each unmapped once read: the host holds at most one file's pages at once
        files = list(dict.fromkeys(reader.files[e.name] for e in entries))
        entries = sorted(entries, key=lambda e: files.index(reader.files[e.name]))
        last = {reader.files[e.name]: e.name for e in entries}
        params: dict = {}
        for e in entries:
            shape = tuple(_get(abstract, e.path).shape)
            read = lambda sl, name=e.name: reader.read(name, sl)  # noqa: E731
            array = jax.make_array_from_callback(
                shape, _get(shardings, e.path),
                lambda index, e=e, read=read, shape=shape: read_part(e, read, index, shape))
            _set(params, e.path, array)
            if last[reader.files[e.name]] == e.name:
                reader.close(reader.files[e.name])
    finally:
        reader.close()
    return fields, params


# --------------------------------------------------------------------------- writing


def _shards(tensors: list[tuple[str, np.ndarray]], max_bytes: int) -> list[list[tuple[str, np.ndarray]]]:
    out: list[list] = [[]]
    size = 0
    for name, a in tensors:
        if out[-1] and size + a.nbytes > max_bytes:
            out.append([])
            size = 0
        out[-1].append((name, a))
        size += a.nbytes
    return out


def hf_tensors(params: Any, model_cfg: Any, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, tensor in ``dtype``) of every parameter, one at a time (each gathered to host)."""
    for e in tensor_map(model_cfg):
        param = np.asarray(jax.device_get(_get(params, e.path)), dtype=np.float32)
        yield e.name, np.ascontiguousarray(to_hf(e, param).astype(DTYPES[dtype]))


def save_llama(params: Any, model_cfg: Any, out_dir: str, *, dtype: str = "float32",
               max_shard_bytes: int = DEFAULT_SHARD_BYTES, eos_id: int | None = None,
               bos_id: int | None = None) -> list[str]:
    """Writes ``config.json`` and the weights (``model.safetensors``, or shards of at most
    ``max_shard_bytes`` with ``model.safetensors.index.json``) to ``out_dir``; returns the files."""
    if dtype not in DTYPES:
        raise UserError(f"export dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    config = hf_config(model_cfg, eos_id, bos_id, dtype)
    os.makedirs(out_dir, exist_ok=True)
    shards = _shards(list(hf_tensors(params, model_cfg, dtype)), int(max_shard_bytes))
    written = []
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        path = os.path.join(out_dir, fname)
        safetensors.numpy.save_file(dict(shard), path + ".tmp", metadata={"format": "pt"})
        os.chmod(path + ".tmp", 0o644)
        os.replace(path + ".tmp", path)
        written.append(path)
        weight_map.update({name: fname for name, _ in shard})
    if len(shards) > 1:
        total = sum(a.nbytes for s in shards for _, a in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_atomic(os.path.join(out_dir, INDEX_FILE), json.dumps(index, indent=2, sort_keys=True))
        written.append(os.path.join(out_dir, INDEX_FILE))
    write_atomic(os.path.join(out_dir, CONFIG_FILE), json.dumps(config, indent=2, sort_keys=True))
    written.append(os.path.join(out_dir, CONFIG_FILE))
    return written


# --------------------------------------------------------------------------- workdirs


def find_tokenizer(hf_dir: str) -> str:
    """``tokenizer.json`` of the checkpoint directory, else its sentencepiece ``tokenizer.model``."""
    for name in (TOKENIZER_JSON, workdir_lib.TOKENIZER_FILE):
        if os.path.isfile(os.path.join(hf_dir, name)):
            return os.path.join(hf_dir, name)
    raise UserError(f"{hf_dir} has no {TOKENIZER_JSON} or {workdir_lib.TOKENIZER_FILE}; "
                    "give the tokenizer with --tokenizer")


def load_tokenizer(path: str, vocab_size: int):
    """The tokenizer at ``path``; UserError naming the file if its vocabulary is not the model's."""
    tok = Tokenizer.load(path)
    if tok.vocab_size != vocab_size:
        raise UserError(f"tokenizer {path} has {tok.vocab_size} tokens but the model's vocabulary "
                        f"(config.json vocab_size) is {vocab_size}")
    return tok


def import_workdir(hf_dir: str, workdir: str, *, tokenizer: str = "", n_ctx: int = 0,
                   dtype: str = "float32") -> dict:
    """Writes a workdir (config.json, the tokenizer, checkpoint 0 holding the parameters) that
    evaluate, generate, compress and ``train.init_from`` read like a trained run's. Everything is
    read and checked before the workdir is created; it must not exist or be empty."""
    hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
    if os.path.exists(workdir) and (not os.path.isdir(workdir) or os.listdir(workdir)):
        raise UserError(f"workdir {workdir} exists and is not an empty folder")
    hf = read_hf_config(hf_dir)
    tok_path = os.path.abspath(tokenizer) if tokenizer else find_tokenizer(hf_dir)
    tok = load_tokenizer(tok_path, int(hf["vocab_size"]))
    fields, params = load_llama(hf_dir, n_ctx=n_ctx, dtype=dtype)
    config = base_config()
    config.name = "hf-" + os.path.basename(hf_dir.rstrip(os.sep))
    config.model.update(fields)
    os.makedirs(workdir, exist_ok=True)
    with WorkdirLock(workdir):
        workdir_lib.write_config(workdir, config)
        tok_name = TOKENIZER_JSON if looks_like_json(tok.serialized()) else workdir_lib.TOKENIZER_FILE
        tok.save(os.path.join(workdir, tok_name))
        checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS_DIR),
                                             keep=1, log=lambda _: None)
        try:
            state = _State(step=0, params=params, opt_state={})
            meta = {"config": config.to_dict(), "tokenizer": ckpt_lib.encode_bytes(tok.serialized()),
                    "imported_from": hf_dir}
            checkpointer.save(0, state, {}, meta)
        finally:
            checkpointer.close()
    return {"workdir": workdir, "tokenizer": tok_path, "params": sum(
        int(np.prod(a.shape)) for a in jax.tree.leaves(params))}


@dataclasses.dataclass
class _State:
    step: int
    params: Any
    opt_state: Any


def export_workdir(workdir: str, out_dir: str, *, dtype: str = "float32",
                   max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Writes the newest checkpoint of ``workdir`` (a Llama transformer) and its tokenizer as a
    Hugging Face checkpoint directory; ``out_dir`` must not exist or be empty."""
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"output directory {out_dir} exists and is not an empty folder")
    config = workdir_lib.load_config(workdir)
    check_exportable(config.model)
    if dtype not in DTYPES:
        raise UserError(f"export dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    run = workdir_lib.load_run(workdir)
    files = save_llama(run.params, run.config.model, out_dir, dtype=dtype,
                       max_shard_bytes=max_shard_bytes, eos_id=run.tokenizer.eos_id,
                       bos_id=run.tokenizer.bos_id)
    blob = run.tokenizer.serialized()
    tok_path = os.path.join(out_dir, TOKENIZER_JSON if looks_like_json(blob)
                            else workdir_lib.TOKENIZER_FILE)
    write_atomic(tok_path, blob)
    return files + [tok_path]


# --------------------------------------------------------------------------- random checkpoints


def filler_tokenizer_json(vocab_size: int) -> bytes:
    """A byte-level tokenizer.json of ``vocab_size`` entries: ``<s>``, ``</s>``, the 256 bytes and
    unreachable filler pieces (no merges), for checkpoints with random weights."""
    if vocab_size < 258:
        raise UserError(f"a byte-level tokenizer needs at least 258 entries, not {vocab_size}")
    vocab = {"<s>": 0, "</s>": 1}
    for ch, _ in sorted(byte_level_chars().items(), key=lambda kv: kv[1]):
        vocab[ch] = len(vocab)
    while len(vocab) < vocab_size:
        vocab[f"\u0120fill{len(vocab)}"] = len(vocab)
    special = [{"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for c, i in (("<s>", 0), ("</s>", 1))]
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": special,
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": []}}
    return json.dumps(spec).encode("utf-8")


def write_random_checkpoint(out_dir: str, *, d_model: int, n_layers: int, n_heads: int,
                            n_kv_heads: int, mlp_hidden: int, vocab_size: int, seed: int = 0,
                            max_shard_bytes: int = 512 << 20, n_ctx: int = 2048) -> int:
    """A Llama checkpoint directory with N(0, 0.02²) float32 weights, unit norms, llama3 RoPE
    scaling and a filler tokenizer.json (for timing imports); shards of at most
    ``max_shard_bytes``, made and written one at a time. Returns the parameter count."""
    cfg = base_config().model
    cfg.update(kind="transformer", d_model=d_model, n_layers=n_layers, n_heads=n_heads,
               n_kv_heads=n_kv_heads, mlp_hidden=mlp_hidden, vocab_size=vocab_size, n_ctx=n_ctx,
               rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
               rope_original_n_ctx=n_ctx // 2)
    rng = np.random.default_rng(seed)
    os.makedirs(out_dir, exist_ok=True)
    entries = tensor_map(cfg)
    groups, size = [[]], 0
    for e in entries:
        nbytes = 4 * int(np.prod(e.hf_shape))
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += nbytes
    weight_map, total = {}, 0
    for k, group in enumerate(groups):
        name = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {e.name: (np.ones(e.hf_shape, np.float32) if len(e.hf_shape) == 1 else
                            0.02 * rng.standard_normal(e.hf_shape, dtype=np.float32))
                   for e in group}
        safetensors.numpy.save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})
        os.chmod(os.path.join(out_dir, name), 0o644)
        weight_map.update({n: name for n in tensors})
        total += sum(a.nbytes for a in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(os.path.join(out_dir, INDEX_FILE), json.dumps(index, indent=2, sort_keys=True))
    write_atomic(os.path.join(out_dir, CONFIG_FILE), json.dumps(hf_config(cfg, 1, 0), indent=2))
    write_atomic(os.path.join(out_dir, TOKENIZER_JSON), filler_tokenizer_json(vocab_size))
    return sum(int(np.prod(e.hf_shape)) for e in entries)
