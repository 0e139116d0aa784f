"""Lossless compression of any byte string with a trained model and arithmetic coding.

The library of ``python -m mixers_jax.compress encode|decode --workdir=DIR IN OUT``:
:func:`encode_bytes` and :func:`decode_bytes`.

**Tokens.** The file's bytes become token ids whose bytes concatenate back to the file exactly:
maximal valid UTF-8 runs go through the tokenizer (checked to round-trip), every other byte is its
byte-fallback piece ``<0xNN>``. If the tokenizer does not reproduce a run exactly, the whole file
is coded as byte pieces (flag in the header).

**Model side** (:mod:`mixers_jax.codec_lanes`). The tokens run through the model in R lanes of
consecutive tokens advancing in lockstep as one batch (R ≤ ``batch``), with a context that
``restart``s every n_ctx − 1 tokens (EOS at position 0, every model) or ``slide``s (Toeplitz and
structured recurrent mixers, RoPE transformers: each token predicted from the n_ctx − 1 before
it). Each step gives integer frequencies (counts ≥ 1, 20 bits of precision) inside the jitted step;
the entropy coder is :mod:`mixers_jax.arithmetic_coder`, one stream with the lanes interleaved.

**Stream** (version 3). Header (63 bytes): magic ``MXAC``, version, tokenisation flag, original
length, token count, payload length, the 16-byte fingerprint of params + tokenizer + model config,
the first 8 bytes of the SHA-256 of the original data, the context (0 restart, 1 slide), the lane
count R, then the CRC-32 of those 59 bytes; then the payload bits. The layout (context, R) is the
encoder's: the decoder uses it, because the model's floating-point results may change with the
batch shape. Decode refuses another model (fingerprint), a damaged header (checksum, or a lane
count :meth:`Layout.plan` would not give), a truncated stream (length) and corrupted content
(hash), each with a UserError; version-1 streams (one batch of all windows, before lanes) are
refused in one line naming the version.

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
magic, version, flag, length, token count, payload length, fingerprint, hash, then the model kind, the format, bits per number and numbers per window;
payload = all windows' vectors, then the coded bits; all windows are one batch (restart layout,
W lanes). Decoding a stream with the other kind of model, or with a workdir whose ``embed_quant`` / width
differs from the stream's, is a UserError.
"""
from __future__ import annotations

import hashlib
import struct
import zlib
from typing import Iterable, Sequence

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mixers_jax.arithmetic_coder import ArithmeticEncoder
from mixers_jax.codec_lanes import (CONTEXTS, DEFAULT_BATCH, FrequencySteps, Layout, code_tokens,
                                    decode_tokens, frequencies, resolve_context, window_count)
from mixers_jax.config import input_length
from mixers_jax.errors import UserError
from mixers_jax.metrics import LN2, QUANT_BITS, STORED_EMBEDDING_KINDS, embedding_accounting, stored_numbers
from mixers_jax.models.autoencoder import Autoencoder, EmbeddingCLM
from mixers_jax.models.bottleneck import QUANTS

MAGIC = b"MXAC"
VERSION = 3  # causal-LM streams in lanes (restart / slide)
EMBEDDING_VERSION = 2  # stored-embedding streams (codec_embedding)
OLD_VERSIONS = {1: "causal-LM streams of one batch of all windows, before lanes and sliding"}
_HEADER = struct.Struct("<4sBBQQQ16s8sBI")  # then the CRC-32 of these bytes
HEADER_BYTES = _HEADER.size + 4

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


# --------------------------------------------------------------------------- causal-LM streams


def window_grid(tokens: Sequence[int], n_ctx: int, eos: int) -> np.ndarray:
    """[W, n_ctx] int32: per window EOS then its n_ctx − 1 tokens, the last one padded with EOS."""
    w, per = window_count(len(tokens), n_ctx), n_ctx - 1
    flat = np.full(w * per, eos, np.int32)
    flat[: len(tokens)] = tokens
    grid = np.full((w, n_ctx), eos, np.int32)
    grid[:, 1:] = flat.reshape(w, per)
    return grid


def pack_causal_header(fields: tuple) -> bytes:
    """The version-3 header: :data:`_HEADER` fields, then the CRC-32 of those bytes."""
    head = _HEADER.pack(*fields)
    return head + struct.pack("<I", zlib.crc32(head))


def encode_bytes(data: bytes, run, context: str = "auto", batch: int = DEFAULT_BATCH) -> tuple[bytes, dict]:
    """Compressed stream of ``data`` and statistics (bits, estimate, tokens, layout). A workdir of
    a stored-embedding kind (autoencoder, embedding_clm) makes an embedding stream, which restarts
    at every window and codes all windows as one batch (``context`` must be 'auto' or 'restart'
    and ``batch`` is not read there)."""
    if run.config.model.kind in STORED_EMBEDDING_KINDS:
        if context not in ("auto", "restart"):
            raise UserError("a stored-embedding stream restarts at every window (each window has "
                            "its own stored vector): --context=slide is not available")
        return encode_embedding_stream(data, run)
    tok = run.tokenizer
    tokens, flag = bytes_to_tokens(data, tok, tok.piece_bytes())
    n = len(tokens)
    layout = Layout.plan(n, input_length(run.config.model), resolve_context(run.model, context), batch)
    enc = ArithmeticEncoder()
    nll_bits = code_tokens(tokens, FrequencySteps(run, layout), int(tok.eos_id), enc) if n else 0.0
    payload = enc.finish() if n else b""
    header = pack_causal_header((MAGIC, VERSION, flag, len(data), n, len(payload), run.fingerprint(),
                                 hashlib.sha256(data).digest()[:8],
                                 CONTEXTS.index(layout.context), layout.lanes))
    stats = {"kind": "causal", "bytes": len(data), "tokens": n,
             "windows": window_count(n, layout.n_ctx), "context": layout.context,
             "lanes": layout.lanes, "lane_length": layout.lane_length,
             "byte_fallback_only": bool(flag), "compressed_bytes": len(header) + len(payload),
             "payload_bytes": len(payload), "model_bits": nll_bits}
    return header + payload, stats


def stream_layout(stream: bytes) -> tuple[str, int, int]:
    """(context, lanes, tokens) of a causal (version-3) stream, from its checked header."""
    check_magic(stream, 5)
    if stream_kind(stream) != "causal":
        raise UserError("--context / --batch apply to causal-LM streams; a stored-embedding stream "
                        "codes all its windows as one batch")
    check_magic(stream, HEADER_BYTES)
    fields = _read_causal_header(stream)
    return CONTEXTS[fields[8]], fields[9], fields[4]


def check_layout_request(stream: bytes, run, context: str | None, batch: int | None) -> None:
    """A UserError unless ``context`` / ``batch`` (None: not given) give the causal stream's own
    layout: the decoder must use the encoder's batch layout, so a differing request is refused."""
    stream_context, lanes, n = stream_layout(stream)
    if context is not None and context not in ("auto", stream_context):
        raise UserError(f"this stream was encoded with --context={stream_context}; decode uses the "
                        f"stream's layout (drop --context or pass --context={stream_context})")
    if batch is not None and n and Layout.plan(n, input_length(run.config.model), stream_context,
                                               batch).lanes != lanes:
        raise UserError(f"this stream was encoded in {lanes} lanes (its batch layout); --batch="
                        f"{batch} gives another layout, and decode must use the encoder's (drop "
                        f"--batch or pass --batch={lanes})")


def _read_causal_header(stream: bytes) -> tuple:
    head = stream[: _HEADER.size]
    (crc,) = struct.unpack_from("<I", stream, _HEADER.size)
    if zlib.crc32(head) != crc:
        raise UserError("corrupted stream (header checksum)")
    fields = _HEADER.unpack(head)
    if fields[8] >= len(CONTEXTS):
        raise UserError("corrupted stream (inconsistent header)")
    return fields


def check_magic(stream: bytes, header_bytes: int) -> None:
    if len(stream) < header_bytes:
        if not stream.startswith(MAGIC[: len(stream)]) or not stream:
            raise UserError("not a mixers_jax compressed stream (bad magic)")
        raise UserError(f"truncated stream: {len(stream)} bytes, shorter than the header")
    if stream[:4] != MAGIC:
        raise UserError("not a mixers_jax compressed stream (bad magic)")


def stream_kind(stream: bytes) -> str:
    """'causal' (version 3) or 'embedding' (version 2) from the version byte after the magic."""
    check_magic(stream, 5)
    version = stream[4]
    if version == VERSION:
        return "causal"
    if version == EMBEDDING_VERSION:
        return "embedding"
    if version in OLD_VERSIONS:
        raise UserError(f"stream format version {version} ({OLD_VERSIONS[version]}) is no longer "
                        f"read: decode it with the mixers_jax that wrote it; this one reads versions "
                        f"{VERSION} (causal LM) and {EMBEDDING_VERSION} (stored embedding)")
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
    """The data of a stream made by :func:`encode_bytes` with this workdir, in the stream's own
    layout (context and lanes; see :mod:`mixers_jax.codec_lanes` for why it must be the same)."""
    check_magic(stream, 5)
    if check_stream_kind(stream, run) == "embedding":
        return decode_embedding_stream(stream, run)
    check_magic(stream, HEADER_BYTES)
    (_, _, flag, length, n, payload_len, fp, digest, context_code,
     lanes) = _read_causal_header(stream)
    payload = stream[HEADER_BYTES:]
    check_payload(payload, payload_len)
    check_fingerprint(fp, run)
    layout = Layout(n, input_length(run.config.model), CONTEXTS[context_code], lanes)
    if (flag not in (0, 1) or n > 8 * len(payload) * 64 + 1 or (n == 0) != (length == 0)
            or not layout.is_planned()):
        raise UserError("corrupted stream (inconsistent header)")
    if layout.context == "slide":
        resolve_context(run.model, "slide")
    eos = int(run.tokenizer.eos_id)
    tokens = decode_tokens(payload, FrequencySteps(run, layout), eos) if n else []
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


class EmbeddingCoder(FrequencySteps):
    """Frequency tables of a stored-embedding model conditioned on the windows' stored vectors
    ``z_WxK`` (as decoded from the stream), all W windows as one batch (``restart`` layout with
    W lanes). 'autoencoder': all n_ctx logits of a window come from z alone (computed once; step t
    reads position t+1). 'embedding_clm': the causal decoder with the injected vector held fixed,
    rerun on the window's grid at every step (it has no step form; positions > t still hold EOS,
    identically when encoding and decoding), reading output t."""

    def __init__(self, run, z_WxK: np.ndarray, n_tokens: int):
        self.z_WxK = jnp.asarray(z_WxK, jnp.float32)
        n_ctx = int(run.config.model.n_ctx)
        w = window_count(n_tokens, n_ctx)
        super().__init__(run, Layout.plan(n_tokens, n_ctx, "restart", max(w, 1)))

    def _make_step(self, method):
        model, variables = self.run.model, {"params": self.run.params}
        if self.run.config.model.kind == "autoencoder":
            self._prepare = jax.jit(lambda z: model.apply(variables, z, method=_autoencoder_logits))

            def step(logits_WxNxV, tokens_W, t, targets_W):
                return (logits_WxNxV,
                        *frequencies(jnp.take(logits_WxNxV, t + 1, axis=1), targets_W))
        else:
            self._prepare = jax.jit(lambda z: model.apply(variables, z, method=_clm_memory))

            def step(cache, tokens_W, t, targets_W):
                grid_WxN, m = cache
                grid_WxN = grid_WxN.at[:, t].set(tokens_W)
                logits = model.apply(variables, grid_WxN, m, method="decode")
                return ((grid_WxN, m), *frequencies(jnp.take(logits, t, axis=1), targets_W))

        return step

    def init_cache(self, lanes: int):
        prepared = self._prepare(self.z_WxK)
        if self.run.config.model.kind == "autoencoder":
            return prepared
        return jnp.full((lanes, self.layout.n_ctx), int(self.run.tokenizer.eos_id), jnp.int32), prepared


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
        coder = EmbeddingCoder(run, unpack_embeddings(embedded, w_count, width, quant), n)
        enc = ArithmeticEncoder()
        nll_bits = code_tokens(tokens, coder, int(tok.eos_id), enc)
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
        tokens = decode_tokens(payload[size:], EmbeddingCoder(run, z, n), int(run.tokenizer.eos_id))
    return check_decoded(tokens_to_bytes(tokens, run.tokenizer.piece_bytes()), length, digest)
