"""A 64-bit-state binary arithmetic coder on Python integers (Witten–Neal–Cleary with pending
underflow bits), the entropy coder of :mod:`mixers_jax.codec`.

The encoder codes a symbol as its interval [lo, hi) of an integer frequency table summing to
``total``; the decoder, given the same tables in the same order, returns the same symbols. The
state keeps 64 bits, so any table with total < 2^62 codes within a few bits of Σ −log2(count/total).
"""
from __future__ import annotations

import numpy as np

STATE_BITS = 64
_FULL = 1 << STATE_BITS
_MASK = _FULL - 1
_HALF = _FULL >> 1
_QUARTER = _HALF >> 1


class ArithmeticEncoder:
    """Symbols in, bits out: :meth:`encode` per symbol, then :meth:`finish` for the bytes."""

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
    """The bytes of :meth:`ArithmeticEncoder.finish` in, the symbols out (:meth:`decode`)."""

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
