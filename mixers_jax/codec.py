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
"""
from __future__ import annotations

import hashlib
import math
import struct
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mixers_jax.errors import UserError
from mixers_jax.generation import resolve_mode

MAGIC = b"MXAC"
VERSION = 1
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


class ModelCoder:
    """The model's integer frequency tables for W windows advancing in lockstep (see module doc)."""

    def __init__(self, run):
        self.run = run
        self.n_ctx = int(run.config.model.n_ctx)
        self.eos = int(run.tokenizer.eos_id)
        self.mode = resolve_mode(run.config.model, "auto")
        model, params = run.model, run.params

        def step(cache, tokens_W, t):
            logits, cache = model.apply({"params": params}, tokens_W, t, cache, method="step")
            logits = logits.astype(jnp.float32)
            e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
            counts = jnp.floor(e * (1 << COUNT_BITS)).astype(jnp.int32) + 1
            return cache, counts, jax.nn.log_softmax(logits, axis=-1)

        self._step = jax.jit(step, donate_argnums=0)

    def windows(self, n_tokens: int) -> int:
        return -(-n_tokens // (self.n_ctx - 1)) if n_tokens else 0

    def run_windows(self, n_tokens: int, fill):
        """Drives the coder: for t = 0, 1, ..., calls ``fill(t, counts [W, V], logp [W, V], grid)``,
        which must set ``grid[w, t+1]`` for every window w holding a real token at t+1, in order
        of w. ``grid`` [W, n_ctx] int32 starts as EOS everywhere (position 0 is always EOS)."""
        w = self.windows(n_tokens)
        per = self.n_ctx - 1
        grid = np.full((w, self.n_ctx), self.eos, np.int32)
        cache = self.run.model.init_cache(w, self.mode)
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


def encode_bytes(data: bytes, run) -> tuple[bytes, dict]:
    """Compressed stream of ``data`` and statistics (bits, estimate, tokens)."""
    tok = run.tokenizer
    table = tok.piece_bytes()
    tokens, flag = bytes_to_tokens(data, tok, table)
    coder = ModelCoder(run)
    per = coder.n_ctx - 1
    n = len(tokens)
    enc = ArithmeticEncoder()
    nll_bits = 0.0
    w_count = coder.windows(n)
    if n:
        flat = np.full(w_count * per, coder.eos, np.int32)
        flat[:n] = tokens
        target = flat.reshape(w_count, per)

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
    payload = enc.finish() if n else b""
    header = _HEADER.pack(MAGIC, VERSION, flag, len(data), n, len(payload), run.fingerprint(),
                          hashlib.sha256(data).digest()[:8])
    stats = {"bytes": len(data), "tokens": n, "windows": w_count, "byte_fallback_only": bool(flag),
             "compressed_bytes": HEADER_BYTES + len(payload), "payload_bytes": len(payload),
             "model_bits": nll_bits}
    return header + payload, stats


def decode_bytes(stream: bytes, run) -> bytes:
    if len(stream) < HEADER_BYTES:
        if not stream.startswith(MAGIC[: len(stream)]) or not stream:
            raise UserError("not a mixers_jax compressed stream (bad magic)")
        raise UserError(f"truncated stream: {len(stream)} bytes, shorter than the header")
    magic, version, flag, length, n, payload_len, fp, digest = _HEADER.unpack_from(stream)
    if magic != MAGIC:
        raise UserError("not a mixers_jax compressed stream (bad magic)")
    if version != VERSION:
        raise UserError(f"stream format version {version}; this program reads version {VERSION}")
    payload = stream[HEADER_BYTES:]
    if len(payload) != payload_len:
        what = "truncated" if len(payload) < payload_len else "corrupted (trailing bytes)"
        raise UserError(f"{what} stream: payload is {len(payload)} bytes, the header says {payload_len}")
    mine = run.fingerprint()
    if fp != mine:
        raise UserError(
            f"this stream was encoded with another model or tokenizer (fingerprint {fp.hex()}); "
            f"--workdir {run.workdir} at step {run.step} has {mine.hex()}"
        )
    if flag not in (0, 1) or n > 8 * len(payload) * 64 + 1 or (n == 0) != (length == 0):
        raise UserError("corrupted stream (inconsistent header)")
    table = run.tokenizer.piece_bytes()
    tokens: list[int] = []
    if n:
        coder = ModelCoder(run)
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
        tokens = grid[:, 1:].reshape(-1)[:n].tolist()
    data = tokens_to_bytes(tokens, table)
    if len(data) != length or hashlib.sha256(data).digest()[:8] != digest:
        raise UserError("corrupted stream: the decoded data does not match the recorded length/hash")
    return data
