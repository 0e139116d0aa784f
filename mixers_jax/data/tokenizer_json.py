"""A Hugging Face ``tokenizer.json`` (the ``tokenizers`` library) behind the interface of
:class:`mixers_jax.data.tokenizer.Tokenizer`: encode / decode / vocab_size / eos (= pad) / the
bytes of every token (docs/hf_import.md#tokenizer).

The bytes a token stands for: special (and control) tokens none; byte-level BPE pieces (GPT-2 /
Llama 3 style, a ``ByteLevel`` pre-tokenizer or decoder) the bytes their characters map back to;
byte-fallback pieces ``<0xNN>`` that byte; other pieces their UTF-8 with ``▁`` read as a space.
Every byte must have a token of its own (the ByteLevel alphabet or the 256 byte-fallback pieces),
so that any bytes can be encoded (compression of invalid UTF-8). ``exact`` is True when the
tokenizer reproduces a probe text exactly and its token bytes add up to the text's bytes (byte-level
BPE without an added prefix space does; a Metaspace tokenizer that prepends a space does not, and
its bits per byte are then approximate, with a warning). Text is encoded without special tokens.
The EOS (also the pad) is the first of :data:`EOS_NAMES` the vocabulary holds.
"""
from __future__ import annotations

import json
import re
from typing import Sequence

import numpy as np
import tokenizers

from mixers_jax.data.token_table import TokenTable, check_unicode
from mixers_jax.errors import UserError

EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def byte_level_chars() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (character -> byte)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _has_type(node, name: str) -> bool:
    """Whether a tokenizer.json (sub)tree holds a component of type ``name``."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def looks_like_json(blob: bytes) -> bool:
    return blob.lstrip()[:1] == b"{"


class JsonTokenizer(TokenTable):
    """A ``tokenizer.json``; the same methods as the sentencepiece :class:`Tokenizer`."""

    def __init__(self, blob: bytes, *, name: str = "<memory>"):
        self._blob = bytes(blob)
        self.name = name
        try:
            spec = json.loads(self._blob.decode("utf-8"))
            self._tok = tokenizers.Tokenizer.from_str(self._blob.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
            raise UserError(f"{name}: not a tokenizer.json ({str(e).splitlines()[0]})") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
        self.eos_id = next((vocab[n] for n in EOS_NAMES if n in vocab), -1)
        if self.eos_id < 0:
            raise UserError(f"{name}: the tokenizer has no EOS token (one of {', '.join(EOS_NAMES)}; "
                            "needed as pad)")
        self.bos_id = next((vocab[n] for n in BOS_NAMES if n in vocab), -1)
        unk = (spec.get("model") or {}).get("unk_token")
        self.unk_id = vocab.get(unk, -1) if unk else -1
        byte_level = _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(
            spec.get("decoder"), "ByteLevel")
        chars = byte_level_chars()
        pieces = [b""] * self.vocab_size
        byte_ids = np.full(256, -1, dtype=np.int64)
        fallback = np.full(256, -1, dtype=np.int64)
        for piece, i in vocab.items():
            m = _BYTE_PIECE.match(piece)
            if i in special or i == self.unk_id:
                continue
            if m:
                pieces[i] = bytes([int(m.group(1), 16)])
                fallback[pieces[i][0]] = i
            elif byte_level and all(c in chars for c in piece):
                pieces[i] = bytes(chars[c] for c in piece)
            else:
                pieces[i] = piece.replace("\u2581", " ").encode("utf-8")
            if len(pieces[i]) == 1 and byte_ids[pieces[i][0]] < 0:
                byte_ids[pieces[i][0]] = i
        byte_ids = np.where(fallback >= 0, fallback, byte_ids)
        if (byte_ids < 0).any():
            raise UserError(f"{name}: the tokenizer has no token for byte "
                            f"0x{int(np.flatnonzero(byte_ids < 0)[0]):02X}, so some text "
                            "cannot be encoded; use a byte-level or byte-fallback tokenizer")
        self._set_tables(pieces, byte_ids)

    @classmethod
    def load(cls, path: str) -> "JsonTokenizer":
        try:
            with open(path, "rb") as f:
                return cls(f.read(), name=path)
        except OSError as e:
            raise UserError(f"cannot read tokenizer {path}: {e.strerror or e}") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens; UserError on a lone surrogate."""
        check_unicode(text)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        for t in texts:
            check_unicode(t)
        return [list(e.ids) for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """Text of ``ids``: the UTF-8 decoding (invalid sequences as U+FFFD) of their bytes."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return b"".join(self._piece_bytes[i] for i in ids).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i)) or ""
