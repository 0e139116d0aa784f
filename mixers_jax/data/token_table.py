"""What both tokenizers (sentencepiece, mixers_jax/data/tokenizer.py; tokenizer.json,
mixers_jax/data/tokenizer_json.py) share: the serialized model bytes stored in checkpoints, the
UTF-8 bytes each token id stands for (bits per byte, the codec), the id of each byte's own token,
and the exactness check.

``exact``: encoding a probe text and decoding it gives the text back, and its tokens' bytes add up
to the text's UTF-8 bytes; otherwise bits per byte are approximate (a warning says so).
"""
from __future__ import annotations

import logging

import numpy as np

from mixers_jax.errors import UserError
from mixers_jax.fileio import write_atomic

_log = logging.getLogger(__name__)

PROBE = "  Hello,\tworld!  \u00e9\u4e2d 12\u2581x\r\n\n\x00 "


def check_unicode(text: str) -> None:
    """UserError if ``text`` cannot be UTF-8 encoded (a lone surrogate); both tokenizers use it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"text is not valid Unicode (lone surrogate at position {e.start})") from None


class TokenTable:
    """The tables and accessors common to both tokenizers; a subclass sets ``name``, ``eos_id``,
    ``vocab_size`` and ``_blob`` (its serialized model), provides ``encode`` / ``decode``, and calls
    :meth:`_set_tables` once its pieces are known."""

    name: str
    eos_id: int
    vocab_size: int
    _blob: bytes

    def _set_tables(self, pieces: list[bytes], byte_ids: np.ndarray, inexact_note: str = "") -> None:
        """Freezes the per-token bytes and the per-byte ids (read-only arrays) and sets ``exact``
        by the probe; ``inexact_note`` is added to the warning when it is False."""
        byte_ids.setflags(write=False)
        self._byte_ids = byte_ids
        self._piece_bytes = tuple(pieces)
        table = np.array([len(p) for p in pieces], dtype=np.int32)
        table.setflags(write=False)
        self._token_bytes = table
        ids = self.encode(PROBE)
        self.exact = self.decode(ids) == PROBE and int(table[ids].sum()) == len(PROBE.encode())
        if not self.exact:
            _log.warning("%s: this tokenizer does not reproduce text exactly%s; bits per byte will "
                         "be approximate", self.name, inexact_note)

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def serialized(self) -> bytes:
        """The model's bytes (a sentencepiece proto or tokenizer.json), stored in checkpoints."""
        return self._blob

    def save(self, path: str) -> None:
        """Writes :meth:`serialized` to ``path`` atomically."""
        write_atomic(path, self._blob)

    @property
    def pad_id(self) -> int:
        """pad = eos: pads and EOS targets are both ignored by the loss."""
        return self.eos_id

    def piece_bytes(self) -> tuple[bytes, ...]:
        """The bytes each token id stands for in decoded text, indexed by id (nothing for control,
        special, unknown and unused tokens). The pieces of ``encode(s)`` join to exactly
        ``s.encode('utf-8')`` when ``exact`` (also where a character is split over byte pieces)."""
        return self._piece_bytes

    def byte_token_ids(self) -> np.ndarray:
        """int64 [256] (read-only): the id of each byte's own token (``<0xNN>`` or byte-level)."""
        return self._byte_ids

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 bytes each token adds to the decoded text (read-only); the
        lengths of :meth:`piece_bytes`."""
        return self._token_bytes

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
