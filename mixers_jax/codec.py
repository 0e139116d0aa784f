"""Lossless compression of any byte string with a trained model and arithmetic coding.

The library of ``python -m mixers_jax.compress encode|decode --workdir=DIR IN OUT``:
:func:`encode_bytes` and :func:`decode_bytes`.

**Tokens.** The file's bytes become token ids whose bytes concatenate back to the file exactly:
maximal valid UTF-8 runs go through the tokenizer (checked to round-trip), every other byte is its
byte-fallback piece ``<0xNN>``. If the tokenizer does not reproduce a run exactly, the whole file
is coded as byte pieces (flag in the header).

**Context.** The token stream is cut into windows of n_ctx − 1 tokens; each window is a fresh
context starting with EOS at position 0 (a document start, as in training with concat packing), so
every token is predicted by the model. All windows advance together as one batch through the
model's step form (recurrent state for structured recurrent mixers, cached inputs / KV cache
otherwise): encode and decode run *the same jitted computation* on the same shapes (on CPU), so
decode sees bit-identical logits. Windows restart rather than slide because masked mixers index
their weights by absolute position.

**Probabilities -> integers.** Inside the same jitted step: e_i = exp(l_i − max l) (float32),
count_i = floor(e_i · 2^20) + 1 (int32; every symbol keeps a count ≥ 1); the cumulative table is an
exact int64 sum on the host. The coder is a 64-bit-state binary arithmetic coder (Witten–Neal–Cleary
with pending underflow bits) on Python integers; the quantisation costs ≲ V/2^20 of probability mass.

**Stream.** Header (54 bytes): magic ``MXAC``, version, tokenisation flag, original length, token
count, payload length, the 16-byte fingerprint of params + tokenizer + model config, and the first
8 bytes of the SHA-256 of the original data; then the payload bits. Decode refuses another model
(fingerprint), a truncated stream (length) and corrupted content (hash), each with a UserError.

**Stored-embedding models** ('autoencoder', 'embedding_clm'; :func:`encode_embedding_stream`).
Same tokens and windows (EOS, then n_ctx − 1 tokens; the last window padded with EOS). Per window
the encoder's stored vector z (``method='embed'``: d_enc/c numbers after the down map and the
``model.embed_quant`` cast) is written in that format — float16 / bfloat16 / float8 as their 2 / 1
bytes, int8 as the 8-bit numbers plus one float32 absmax scale per window (the accounting does not
count the scale), 'none' as float32 — and the quantized formats require ``model.embed_bits`` to equal
their width, so the stream holds exactly the bits the accounting charges. Then the tokens are coded
by the same loop as a causal LM's, the decoder conditioned on z as *read back from those bytes*
(:class:`EmbeddingCoder`): the autoencoder's logits at positions 1..n_ctx − 1 of the window, or
the embedding_clm's causal decoder with its injected vector fixed. Header (version 2, 61 bytes):
the version-1 fields, then the model kind, the format, bits per number and numbers per window;
payload = all windows' vectors, then the coded bits. Version-1 (causal) streams are unchanged;
decoding a stream with the other kind of model, or with a workdir whose ``embed_quant`` / width
differs from the stream's, is a UserError.
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Iterable, Sequence

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mixers_jax.errors import UserError
from mixers_jax.generation import resolve_mode
from mixers_jax.metrics import LN2, QUANT_BITS, STORED_EMBEDDING_KINDS, embedding_accounting, stored_numbers
from mixers_jax.models.autoencoder import Autoencoder, EmbeddingCLM
from mixers_jax.models.bottleneck import QUANTS

MAGIC = b"MXAC"
VERSION = 1  # causal-LM streams
EMBEDDING_VERSION = 2  # stored-embedding streams (codec_embedding)
COUNT_BITS = 20
_HEADER = struct.Struct("<4sBBQQQ16s8s")
HEADER_BYTES = _HEADER.size

STATE_BITS = 64
_FULL = 1 << STATE_BITS
_MASK = _FULL - 1
_HALF = _FULL >> 1
_QUARTER = _HALF >> 1


# --------------------------------------------------------------------------- arithmetic coder


class ArithmeticEncoder:
    def __init__(self):
        self.low, self.high, self.pending = 0, _MASK, 0
        self.bits: list[int] = []

    def _emit(self, bit: int) -> None:
        self.bits.append(bit)
        if self.pending:
            self.bits.extend([bit ^ 1] * self.pending)
            self.pending = 0

    def encode(self, lo: int, hi: int, total: int) -> None:
        """Codes the symbol occupying [lo, hi) of a table summing to ``total`` (lo < hi ≤ total)."""
        rng = self.high - self.low + 1
        self.high = self.low + rng * hi // total - 1
        self.low = self.low + rng * lo // total
        while ((self.low ^ self.high) & _HALF) == 0:
            self._emit(self.low >> (STATE_BITS - 1))
            self.low = (self.low << 1) & _MASK
            self.high = ((self.high << 1) & _MASK) | 1
        while self.low & ~self.high & _QUARTER:
            self.pending += 1
            self.low = (self.low << 1) ^ _HALF
            self.high = ((self.high ^ _HALF) << 1) | _HALF | 1

    def finish(self) -> bytes:
        self._emit(1)
        return np.packbits(np.asarray(self.bits, np.uint8)).tobytes() if self.bits else b""


class ArithmeticDecoder:
    def __init__(self, payload: bytes):
        self._bits = np.unpackbits(np.frombuffer(payload, np.uint8)).tolist()
        self._pos = 0
        self.low, self.high = 0, _MASK
        self.code = 0
        for _ in range(STATE_BITS):
            self.code = (self.code << 1) | self._read()

    def _read(self) -> int:
        pos = self._pos
        self._pos += 1
        return self._bits[pos] if pos < len(self._bits) else 0

    def decode(self, cum: np.ndarray) -> int:
        """Symbol s with cum[s] ≤ target < cum[s+1]; ``cum`` int64 [V+1], cum[0] = 0."""
        total = int(cum[-1])
        rng = self.high - self.low + 1
        value = ((self.code - self.low + 1) * total - 1) // rng
        s = int(np.searchsorted(cum, value, side="right")) - 1
        s = min(max(s, 0), len(cum) - 2)
        lo, hi = int(cum[s]), int(cum[s + 1])
        self.high = self.low + rng * hi // total - 1
        self.low = self.low + rng * lo // total
        while ((self.low ^ self.high) & _HALF) == 0:
            self.low = (self.low << 1) & _MASK
            self.high = ((self.high << 1) & _MASK) | 1
            self.code = ((self.code << 1) & _MASK) | self._read()
        while self.low & ~self.high & _QUARTER:
            self.low = (self.low << 1) ^ _HALF
            self.high = ((self.high ^ _HALF) << 1) | _HALF | 1
            self.code = (self.code & _HALF) | ((self.code << 1) & (_MASK >> 1)) | self._read()
        return s


# --------------------------------------------------------------------------- bytes <-> tokens


def tokens_to_bytes(tokens: Iterable[int], table: Sequence[bytes]) -> bytes:
    """The bytes of ``tokens``; ``table``: the tokenizer's ``piece_bytes()``."""
    return b"".join(table[int(t)] for t in tokens)


def byte_tokens(data: bytes, tokenizer) -> list[int]:
    ids = tokenizer.byte_token_ids()
    return [int(ids[b]) for b in data]


def bytes_to_tokens(data: bytes, tokenizer, table: Sequence[bytes]) -> tuple[list[int], int]:
    """(tokens, flag): flag 0 = tokenizer + byte pieces for invalid UTF-8, 1 = all byte pieces."""
    text = data.decode("utf-8", errors="surrogateescape")  # invalid bytes -> U+DC80..U+DCFF
    tokens: list[int] = []
    run: list[str] = []

    def flush():
        if run:
            tokens.extend(tokenizer.encode("".join(run)))
            run.clear()

    byte_ids = tokenizer.byte_token_ids()
    for ch in text:
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            flush()
            tokens.append(int(byte_ids[o - 0xDC00]))
        else:
            run.append(ch)
    flush()
    if tokens_to_bytes(tokens, table) == data:
        return tokens, 0
    return byte_tokens(data, tokenizer), 1


# --------------------------------------------------------------------------- the model side


def window_count(n_tokens: int, n_ctx: int) -> int:
    """Windows of n_ctx − 1 tokens (each after an EOS) covering ``n_tokens`` tokens."""
    return -(-n_tokens // (n_ctx - 1)) if n_tokens else 0


def window_grid(tokens: Sequence[int], n_ctx: int, eos: int) -> np.ndarray:
    """[W, n_ctx] int32: per window EOS then its n_ctx − 1 tokens, the last one padded with EOS."""
    w, per = window_count(len(tokens), n_ctx), n_ctx - 1
    flat = np.full(w * per, eos, np.int32)
    flat[: len(tokens)] = tokens
    grid = np.full((w, n_ctx), eos, np.int32)
    grid[:, 1:] = flat.reshape(w, per)
    return grid


def _integer_counts(logits):
    """(counts int32 [.., V], log-probabilities float32 [.., V]) of fp32 logits (module doc)."""
    logits = logits.astype(jnp.float32)
    e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
    counts = jnp.floor(e * (1 << COUNT_BITS)).astype(jnp.int32) + 1
    return counts, jax.nn.log_softmax(logits, axis=-1)


class ModelCoder:
    """The model's integer frequency tables for W windows advancing in lockstep (see module doc).

    :class:`EmbeddingCoder` changes only where the logits of step t come from (:meth:`_make_step`,
    :meth:`init_cache`); the per-token loop (:meth:`run_windows`) is the same for every kind."""

    def __init__(self, run):
        self.run = run
        self.n_ctx = int(run.config.model.n_ctx)
        self.eos = int(run.tokenizer.eos_id)
        self._step = jax.jit(self._make_step(), donate_argnums=0)

    def _make_step(self):
        """step(cache, tokens_W, t) -> (cache, counts [W, V], logp [W, V]) for grid position t+1."""
        model, params = self.run.model, self.run.params
        self.mode = resolve_mode(self.run.config.model, "auto")

        def step(cache, tokens_W, t):
            logits, cache = model.apply({"params": params}, tokens_W, t, cache, method="step")
            return (cache, *_integer_counts(logits))

        return step

    def init_cache(self, w: int):
        return self.run.model.init_cache(w, self.mode)

    def windows(self, n_tokens: int) -> int:
        return window_count(n_tokens, self.n_ctx)

    def run_windows(self, n_tokens: int, fill):
        """Drives the coder: for t = 0, 1, ..., calls ``fill(t, counts [W, V], logp [W, V], grid)``,
        which must set ``grid[w, t+1]`` for every window w holding a real token at t+1, in order
        of w. ``grid`` [W, n_ctx] int32 starts as EOS everywhere (position 0 is always EOS)."""
        w = self.windows(n_tokens)
        per = self.n_ctx - 1
        grid = np.full((w, self.n_ctx), self.eos, np.int32)
        cache = self.init_cache(w)
        steps = min(per, n_tokens)
        for t in range(steps):
            cache, counts, logp = self._step(cache, jnp.asarray(grid[:, t]), jnp.int32(t))
            fill(t, np.asarray(counts), logp, grid)
        return grid

    @staticmethod
    def real(t: int, w_count: int, n_tokens: int, per: int) -> np.ndarray:
        """Windows whose position t+1 holds a real token."""
        idx = np.arange(w_count) * per + t
        return np.nonzero(idx < n_tokens)[0]


def code_tokens(tokens: Sequence[int], coder: ModelCoder, enc: ArithmeticEncoder) -> float:
    """Codes ``tokens`` window by window into ``enc``; returns Σ −log2 p of the coded tokens."""
    per, n = coder.n_ctx - 1, len(tokens)
    if not n:
        return 0.0
    w_count = coder.windows(n)
    target = window_grid(tokens, coder.n_ctx, coder.eos)[:, 1:]
    nll_bits = 0.0

    def fill(t, counts, logp, grid):
        nonlocal nll_bits
        rows = ModelCoder.real(t, w_count, n, per)
        syms = target[rows, t]
        grid[:, t + 1] = target[:, t]
        cum = np.cumsum(counts[rows].astype(np.int64), axis=1)
        lp = np.asarray(logp)[rows, syms].astype(np.float64)
        nll_bits += float(-lp.sum() / math.log(2.0))
        for k, s in enumerate(syms):
            hi = int(cum[k, s])
            enc.encode(hi - int(counts[rows[k], s]), hi, int(cum[k, -1]))

    coder.run_windows(n, fill)
    return nll_bits


def decode_tokens(payload: bytes, n: int, coder: ModelCoder) -> list[int]:
    """The ``n`` tokens :func:`code_tokens` coded into ``payload`` with the same ``coder``."""
    if not n:
        return []
    per = coder.n_ctx - 1
    w_count = coder.windows(n)
    dec = ArithmeticDecoder(payload)

    def fill(t, counts, logp, grid):
        rows = ModelCoder.real(t, w_count, n, per)
        cum = np.zeros((len(rows), counts.shape[1] + 1), np.int64)
        np.cumsum(counts[rows].astype(np.int64), axis=1, out=cum[:, 1:])
        for k, w in enumerate(rows):
            grid[w, t + 1] = dec.decode(cum[k])

    grid = coder.run_windows(n, fill)
    return grid[:, 1:].reshape(-1)[:n].tolist()


def encode_bytes(data: bytes, run) -> tuple[bytes, dict]:
    """Compressed stream of ``data`` and statistics (bits, estimate, tokens). A workdir of a
    stored-embedding kind (autoencoder, embedding_clm) makes an embedding stream (codec_embedding)."""
    if run.config.model.kind in STORED_EMBEDDING_KINDS:
        return encode_embedding_stream(data, run)
    tok = run.tokenizer
    tokens, flag = bytes_to_tokens(data, tok, tok.piece_bytes())
    coder = ModelCoder(run)
    enc = ArithmeticEncoder()
    nll_bits = code_tokens(tokens, coder, enc)
    n = len(tokens)
    payload = enc.finish() if n else b""
    header = _HEADER.pack(MAGIC, VERSION, flag, len(data), n, len(payload), run.fingerprint(),
                          hashlib.sha256(data).digest()[:8])
    stats = {"kind": "causal", "bytes": len(data), "tokens": n, "windows": coder.windows(n),
             "byte_fallback_only": bool(flag), "compressed_bytes": HEADER_BYTES + len(payload),
             "payload_bytes": len(payload), "model_bits": nll_bits}
    return header + payload, stats


def check_magic(stream: bytes, header_bytes: int) -> None:
    if len(stream) < header_bytes:
        if not stream.startswith(MAGIC[: len(stream)]) or not stream:
            raise UserError("not a mixers_jax compressed stream (bad magic)")
        raise UserError(f"truncated stream: {len(stream)} bytes, shorter than the header")
    if stream[:4] != MAGIC:
        raise UserError("not a mixers_jax compressed stream (bad magic)")


def stream_kind(stream: bytes) -> str:
    """'causal' (version 1) or 'embedding' (version 2) from the version byte after the magic."""
    check_magic(stream, 5)
    version = stream[4]
    if version == VERSION:
        return "causal"
    if version == EMBEDDING_VERSION:
        return "embedding"
    raise UserError(f"stream format version {version}; this program reads versions "
                    f"{VERSION} (causal LM) and {EMBEDDING_VERSION} (stored embedding)")


def check_payload(payload: bytes, payload_len: int) -> None:
    if len(payload) != payload_len:
        what = "truncated" if len(payload) < payload_len else "corrupted (trailing bytes)"
        raise UserError(f"{what} stream: payload is {len(payload)} bytes, the header says {payload_len}")


def check_fingerprint(fp: bytes, run) -> None:
    mine = run.fingerprint()
    if fp != mine:
        raise UserError(
            f"this stream was encoded with another model or tokenizer (fingerprint {fp.hex()}); "
            f"--workdir {run.workdir} at step {run.step} has {mine.hex()}"
        )


def check_decoded(data: bytes, length: int, digest: bytes) -> bytes:
    if len(data) != length or hashlib.sha256(data).digest()[:8] != digest:
        raise UserError("corrupted stream: the decoded data does not match the recorded length/hash")
    return data


def check_stream_kind(stream: bytes, run) -> str:
    """The stream's kind; a UserError when the workdir's model is of the other kind."""
    kind = stream_kind(stream)
    workdir_kind = str(run.config.model.kind)
    embedded = workdir_kind in STORED_EMBEDDING_KINDS
    if (kind == "embedding") != embedded:
        made = "a stored-embedding model (autoencoder / embedding_clm)" if kind == "embedding" \
            else "a causal LM"
        raise UserError(f"this stream was made by {made}; --workdir {run.workdir} holds a "
                        f"model.kind={workdir_kind!r} model")
    return kind


def decode_bytes(stream: bytes, run) -> bytes:
    check_magic(stream, HEADER_BYTES)
    if check_stream_kind(stream, run) == "embedding":
        return decode_embedding_stream(stream, run)
    magic, version, flag, length, n, payload_len, fp, digest = _HEADER.unpack_from(stream)
    payload = stream[HEADER_BYTES:]
    check_payload(payload, payload_len)
    check_fingerprint(fp, run)
    if flag not in (0, 1) or n > 8 * len(payload) * 64 + 1 or (n == 0) != (length == 0):
        raise UserError("corrupted stream (inconsistent header)")
    tokens = decode_tokens(payload, n, ModelCoder(run)) if n else []
    return check_decoded(tokens_to_bytes(tokens, run.tokenizer.piece_bytes()), length, digest)


# --------------------------------------------------------------------------- stored-embedding streams


def _from_stored(mdl, z_WxK, fn):
    """``fn(e)`` inside the bound composite model ``mdl`` with the bottleneck's stored vector
    replaced by ``z_WxK``: the encoder is not run (its ``encode`` returns e, a placeholder of width
    d_enc, or z itself when c = 1 and z = quantize(e)), and with c > 1 the bottleneck's ``down``
    map returns z. The rest (quantize — exact for the float formats, whose values z already is —,
    up, bridge, injection) is the model's own code."""
    c = int(mdl.embedding.compression)
    e = z_WxK if c == 1 else jnp.zeros((z_WxK.shape[0], int(mdl.d_encoder)), z_WxK.dtype)

    def put(next_fun, args, kwargs, context):
        if context.method_name == "encode" and isinstance(context.module, (Autoencoder, EmbeddingCLM)):
            return e
        if c > 1 and context.method_name == "__call__" and context.module.name == "down":
            return z_WxK
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(put):
        return fn(e)


def _autoencoder_logits(mdl, z_WxK):
    """Autoencoder logits [W, n_ctx, V] reconstructing each window from its stored vector."""
    return mdl.decode(_from_stored(mdl, z_WxK, mdl.expand_embedding))


def _clm_memory(mdl, z_WxK):
    """The injected vector m of an embedding_clm from its stored vector."""
    tokens = jnp.zeros((z_WxK.shape[0], int(mdl.n_ctx)), jnp.int32)  # unread: encode is replaced
    return _from_stored(mdl, z_WxK, lambda e: mdl.memory(tokens))


class EmbeddingCoder(ModelCoder):
    """Frequency tables of a stored-embedding model conditioned on the windows' stored vectors
    ``z_WxK`` (as decoded from the stream). 'autoencoder': all n_ctx logits of a window come from
    z alone (computed once; step t reads position t+1). 'embedding_clm': the causal decoder with
    the injected vector held fixed, rerun on the window's grid at every step (it has no step form;
    positions > t still hold EOS, identically when encoding and decoding), reading output t."""

    def __init__(self, run, z_WxK: np.ndarray):
        self.z_WxK = jnp.asarray(z_WxK, jnp.float32)
        super().__init__(run)

    def _make_step(self):
        model, variables = self.run.model, {"params": self.run.params}
        if self.run.config.model.kind == "autoencoder":
            self._prepare = jax.jit(lambda z: model.apply(variables, z, method=_autoencoder_logits))

            def step(logits_WxNxV, tokens_W, t):
                return (logits_WxNxV, *_integer_counts(jnp.take(logits_WxNxV, t + 1, axis=1)))
        else:
            self._prepare = jax.jit(lambda z: model.apply(variables, z, method=_clm_memory))

            def step(cache, tokens_W, t):
                grid_WxN, m = cache
                grid_WxN = grid_WxN.at[:, t].set(tokens_W)
                logits = model.apply(variables, grid_WxN, m, method="decode")
                return ((grid_WxN, m), *_integer_counts(jnp.take(logits, t, axis=1)))

        return step

    def init_cache(self, w: int):
        prepared = self._prepare(self.z_WxK)
        if self.run.config.model.kind == "autoencoder":
            return prepared
        return jnp.full((w, self.n_ctx), self.eos, jnp.int32), prepared


EMBEDDING_KINDS = ("autoencoder", "embedding_clm")  # codes 1, 2 in the header
_EMB_HEADER = struct.Struct("<4sBBQQQ16s8sBBBI")
EMB_HEADER_BYTES = _EMB_HEADER.size
INT8_SCALE_BITS = 32  # int8: one float32 absmax scale per vector besides the 8-bit numbers


def embedding_format(model_cfg) -> tuple[str, int]:
    """(embed_quant, bits per stored number) of a workdir's model. Every quantized format stores
    exactly ``model.embed_bits`` bits per number, as the accounting charges; a mismatch is an
    error. 'none' stores the unquantized float32 vector (32 bits, whatever embed_bits says)."""
    quant, bits = str(model_cfg.embed_quant), int(model_cfg.embed_bits)
    width = QUANT_BITS[quant]
    if quant != "none" and bits != width:
        raise UserError(f"model.embed_bits={bits} but model.embed_quant={quant!r} stores {width} "
                        f"bits per number; the codec stores exactly what the accounting charges")
    return quant, width


def window_embedding_bytes(quant: str, width: int) -> int:
    """Bytes of one window's stored vector of ``width`` numbers in format ``quant``."""
    return width * QUANT_BITS[quant] // 8 + (INT8_SCALE_BITS // 8 if quant == "int8" else 0)


def pack_embeddings(z_WxK: np.ndarray, quant: str) -> bytes:
    """The stored vectors in ``quant``: float formats cast (exact for vectors the model already
    quantized), 'none' float32, 'int8' the numbers round(z/s) then the float32 scales
    s = max|z|/127 (one per window)."""
    z = np.asarray(z_WxK, np.float32)
    if quant == "int8":
        scale = (np.max(np.abs(z), axis=-1, keepdims=True) / np.float32(127.0)).astype(np.float32)
        safe = np.where(scale > 0, scale, np.float32(1.0))
        q = np.clip(np.round(z / safe), -127, 127).astype(np.int8)
        return q.tobytes() + safe.astype("<f4").tobytes()
    dtype = np.dtype("<f4") if quant == "none" else np.dtype(jnp.dtype(quant))
    return z.astype(dtype).tobytes()


def unpack_embeddings(buf: bytes, w: int, width: int, quant: str) -> np.ndarray:
    """float32 [W, width] from :func:`pack_embeddings`'s bytes."""
    if quant == "int8":
        q = np.frombuffer(buf, np.int8, w * width).reshape(w, width)
        scale = np.frombuffer(buf, "<f4", w, offset=w * width).reshape(w, 1)
        return q.astype(np.float32) * scale
    dtype = np.dtype("<f4") if quant == "none" else np.dtype(jnp.dtype(quant))
    return np.frombuffer(buf, dtype).reshape(w, width).astype(np.float32)


def encode_embedding_stream(data: bytes, run) -> tuple[bytes, dict]:
    """Stream of a stored-embedding model: per window its stored vector (the workdir's format),
    then the tokens arithmetic-coded under the decoder conditioned on the stored vectors."""
    cfg = run.config.model
    quant, bits = embedding_format(cfg)
    tok = run.tokenizer
    tokens, flag = bytes_to_tokens(data, tok, tok.piece_bytes())
    n = len(tokens)
    width = int(stored_numbers(cfg))
    w_count = window_count(n, int(cfg.n_ctx))
    embedded, nll_bits, residual = b"", 0.0, b""
    if n:
        rows = window_grid(tokens, int(cfg.n_ctx), int(tok.eos_id))
        z = jax.jit(lambda t: run.model.apply({"params": run.params}, t, method="embed"))(rows)
        embedded = pack_embeddings(np.asarray(z), quant)
        coder = EmbeddingCoder(run, unpack_embeddings(embedded, w_count, width, quant))
        enc = ArithmeticEncoder()
        nll_bits = code_tokens(tokens, coder, enc)
        residual = enc.finish()
    payload = embedded + residual
    header = _EMB_HEADER.pack(MAGIC, EMBEDDING_VERSION, flag, len(data), n, len(payload),
                              run.fingerprint(), hashlib.sha256(data).digest()[:8],
                              EMBEDDING_KINDS.index(cfg.kind) + 1, QUANTS.index(quant), bits, width)
    sums = {"nll": nll_bits * LN2, "tokens": n, "bytes": len(data)}
    stats = {"kind": str(cfg.kind), "bytes": len(data), "tokens": n, "windows": w_count,
             "byte_fallback_only": bool(flag), "compressed_bytes": EMB_HEADER_BYTES + len(payload),
             "payload_bytes": len(payload), "header_bytes": EMB_HEADER_BYTES,
             "embedding_bits": 8 * len(embedded), "residual_bits": 8 * len(residual),
             "model_bits": nll_bits, "embed_quant": quant, "bits_per_number": bits,
             "stored_numbers": width, "accounting_embed_bits": int(cfg.embed_bits),
             "accounting_total_bpb": (embedding_accounting(sums, width, int(cfg.embed_bits), w_count)
                                      ["total_bpb"] if data else float("nan"))}
    return header + payload, stats


def decode_embedding_stream(stream: bytes, run) -> bytes:
    check_magic(stream, EMB_HEADER_BYTES)
    (_, _, flag, length, n, payload_len, fp, digest, kind_code, quant_code, bits,
     width) = _EMB_HEADER.unpack_from(stream)
    payload = stream[EMB_HEADER_BYTES:]
    check_payload(payload, payload_len)
    cfg = run.config.model
    if not 1 <= kind_code <= len(EMBEDDING_KINDS) or quant_code >= len(QUANTS):
        raise UserError("corrupted stream (inconsistent header)")
    made_by, quant = EMBEDDING_KINDS[kind_code - 1], QUANTS[quant_code]
    if made_by != cfg.kind:
        raise UserError(f"this stream was made by a model.kind={made_by!r} model; --workdir "
                        f"{run.workdir} holds a model.kind={str(cfg.kind)!r} model")
    if quant != str(cfg.embed_quant) or width != stored_numbers(cfg):
        raise UserError(f"embedding format mismatch: the stream stores {width} numbers per window as "
                        f"{quant!r}; --workdir {run.workdir} was trained for {stored_numbers(cfg)} "
                        f"as model.embed_quant={str(cfg.embed_quant)!r}")
    check_fingerprint(fp, run)
    if bits != QUANT_BITS[quant] or flag not in (0, 1) or (n == 0) != (length == 0):
        raise UserError("corrupted stream (inconsistent header)")
    tokens: list[int] = []
    if n:
        w_count = window_count(n, int(cfg.n_ctx))
        size = w_count * window_embedding_bytes(quant, width)
        if len(payload) < size:
            raise UserError("corrupted stream (inconsistent header)")
        z = unpack_embeddings(payload[:size], w_count, width, quant)
        if not np.isfinite(z).all():
            raise UserError("corrupted stream (a stored embedding is not finite)")
        tokens = decode_tokens(payload[size:], n, EmbeddingCoder(run, z))
    return check_decoded(tokens_to_bytes(tokens, run.tokenizer.piece_bytes()), length, digest)
