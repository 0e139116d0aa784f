"""SentencePiece BPE tokenizer with byte fallback, so that every UTF-8 string round-trips exactly.

Trained models use: BPE; byte fallback (the 256 pieces ``<0x00>``..``<0xFF>``); identity normalization
(no NFKC); no dummy prefix; whitespace kept as is; digits split; whitespace-only pieces allowed.
Ids: unk 0, bos 1, eos 2, then the byte pieces 3..258, then the learned pieces. **pad = eos**
(sentencepiece's own pad id is disabled), as in docs/objectives.md#targets-and-ignored-positions.
Text is encoded without BOS/EOS.

Exactness. For every Python string ``s`` that is valid Unicode (no lone surrogates)::

    decode(encode(s)) == s
    token_bytes()[encode(s)].sum() == len(s.encode('utf-8'))

Two details make this hold:

* sentencepiece treats a literal U+2581 (``▁``, its whitespace meta symbol) in the input as a space,
  so ``decode(encode('a▁b')) == 'a b'``. :meth:`Tokenizer.encode` therefore cuts the text at literal
  ``▁`` characters and emits that character as its three byte-fallback pieces ``<0xE2><0x96><0x81>``,
  which decode back to ``▁``.
* Newlines and carriage returns are kept out of the tokenizer's training sentences (training text is cut
  into lines), so they are always single byte pieces (``<0x0A>``, ``<0x0D>``), like other control
  characters.

Models loaded from elsewhere (``config.data.tokenizer_model``) must have the 256 byte pieces and an EOS
piece; a model whose normalizer changes text (NFKC, dummy prefix) still loads, but ``exact`` is then
False and a warning is logged, because bits per byte would be measured on changed text.
"""
from __future__ import annotations

import collections
import io
import logging
import os
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from mixers_jax.data.token_table import TokenTable, check_unicode
from mixers_jax.data.tokenizer_json import JsonTokenizer, looks_like_json
from mixers_jax.errors import UserError

_log = logging.getLogger(__name__)

_META = "\u2581"  # sentencepiece's whitespace symbol
_N_SPECIAL = 3  # unk, bos, eos
MIN_VOCAB = 256 + _N_SPECIAL + 1
_COVERAGE = 0.9995
_MIN_COVERAGE = 0.98
_LINE_CHARS = 2048  # training sentences are cut to at most this many characters


def _num_threads() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _training_sentences(docs: Iterable[str], max_chars: int) -> Iterator[str]:
    """Lines of the documents (without line breaks), long lines cut, up to ``max_chars`` in all."""
    budget = int(max_chars) if max_chars and max_chars > 0 else None
    for doc in docs:
        for line in re.split(r"\r?\n|\r", doc):
            while line:
                if len(line) > _LINE_CHARS:
                    cut = line.rfind(" ", _LINE_CHARS // 2, _LINE_CHARS)
                    cut = cut if cut > 0 else _LINE_CHARS
                    piece, line = line[:cut], line[cut:]
                else:
                    piece, line = line, ""
                if budget is not None:
                    if budget <= 0:
                        return
                    piece = piece[:budget]
                    budget -= len(piece)
                yield piece


def _char_counts(docs: Iterable[str], max_chars: int) -> list[int]:
    """Character frequencies of the training sentences, most frequent first."""
    counts: collections.Counter = collections.Counter()
    for s in _training_sentences(docs, max_chars):
        counts.update(s)
    return sorted(counts.values(), reverse=True)



class Tokenizer(TokenTable):
    """A sentencepiece model plus the per-token UTF-8 byte table used for bits per byte."""

    def __init__(self, proto: bytes, *, name: str = "<memory>"):
        self._blob = bytes(proto)
        self.name = name
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._blob)
        except Exception as e:
            raise UserError(f"{name}: not a sentencepiece model ({str(e).splitlines()[0]})") from None
        self._sp = sp
        self.vocab_size = int(sp.vocab_size())
        self.eos_id = int(sp.eos_id())
        if self.eos_id < 0:
            raise UserError(f"{name}: the tokenizer model has no EOS piece (needed as pad)")
        self.bos_id = int(sp.bos_id())
        self.unk_id = int(sp.unk_id())
        byte_ids = np.full(256, -1, dtype=np.int64)
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                piece = sp.id_to_piece(i)  # '<0xNN>'
                byte_ids[int(piece[3:5], 16)] = i
        if (byte_ids < 0).any():
            raise UserError(
                f"{name}: the tokenizer model lacks byte-fallback pieces, so some text cannot be "
                "encoded exactly; train it with byte_fallback=True"
            )
        self._meta_ids = [int(byte_ids[b]) for b in _META.encode("utf-8")]
        pieces = []
        for i in range(self.vocab_size):
            if sp.is_byte(i):
                pieces.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                pieces.append(b"")
            else:
                pieces.append(sp.id_to_piece(i).replace(_META, " ").encode("utf-8"))
        # piece_bytes: byte pieces <0xNN> that byte; control, unknown and unused pieces nothing;
        # others the piece's UTF-8 with ▁ read as a space
        self._set_tables(pieces, byte_ids, " (its normalizer changes text)")

    # ---------------------------------------------------------------------------------------------
    # Construction

    @classmethod
    def train(
        cls,
        docs: Sequence[str],
        vocab_size: int,
        model_path: str | None = None,
        max_chars: int = 20_000_000,
    ) -> "Tokenizer":
        """Trains a BPE model on ``docs`` (their first ``max_chars`` characters, line by line).

        Deterministic: no sampling or shuffling. The model is written atomically to ``model_path``
        (temp file + os.replace) when given; ``None`` keeps it in memory only.

        Character coverage is 0.9995. When ``vocab_size`` cannot hold the characters that needs
        (small vocabularies on multilingual text), coverage is lowered (not below 0.98, sentencepiece's
        floor) so that the most frequent characters fill about 3/4 of the free slots; the rest are
        spelled with byte pieces, so text still round-trips exactly. A warning is logged.

        Raises:
            UserError: vocab_size below 260 or too small for the characters of 98% of the text, or a
                corpus too small to make vocab_size pieces.
        """
        vocab_size = int(vocab_size)
        if vocab_size < MIN_VOCAB:
            raise UserError(
                f"vocab_size {vocab_size} is too small: byte fallback needs 256 byte pieces + "
                f"{_N_SPECIAL} special pieces, so at least {MIN_VOCAB}"
            )
        coverage = _COVERAGE
        counts: list[int] | None = None
        keep = max(1, (vocab_size - 256 - _N_SPECIAL) * 3 // 4)
        proto, last_error = None, ""
        for _ in range(6):
            try:
                proto = cls._train_proto(docs, vocab_size, max_chars, coverage)
                break
            except RuntimeError as e:
                last_error = str(e)
                m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", last_error)
                if not m or coverage <= _MIN_COVERAGE:
                    raise cls._training_error(last_error, vocab_size) from None
                if counts is None:
                    counts = _char_counts(docs, max_chars)
                else:  # still too many: drop the excess and retry
                    keep = max(1, keep - (int(m.group(2)) - int(m.group(1))) - 1)
                keep = min(keep, len(counts))
                total = sum(counts)
                before, upto = sum(counts[: keep - 1]), sum(counts[:keep])
                # sentencepiece adds characters while their share is below the coverage; it
                # refuses coverages under 0.98
                coverage = max(_MIN_COVERAGE, (before + upto) / 2 / total)
                _log.warning(
                    "vocab_size %d cannot hold the characters of %.2f%% of the text; retrying with "
                    "character coverage %.4f; the other characters fall back to byte pieces",
                    vocab_size, 100 * _COVERAGE, coverage,
                )  # fmt: skip
        if proto is None:
            raise cls._training_error(last_error, vocab_size)
        tok = cls(proto, name=model_path or "<trained>")
        if model_path:
            tok.save(model_path)
        return tok

    @staticmethod
    def _train_proto(docs: Sequence[str], vocab_size: int, max_chars: int, coverage: float) -> bytes:
        sentences = (s for s in _training_sentences(docs, max_chars) if s)
        writer = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences,
            model_writer=writer,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=coverage,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            max_sentence_length=4 * _LINE_CHARS + 16,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            num_threads=_num_threads(),
            minloglevel=2,
        )
        return writer.getvalue()

    @staticmethod
    def _training_error(msg: str, vocab_size: int) -> UserError:
        m = re.search(r"Please set it to a value <= (\d+)", msg)
        if m:
            return UserError(
                f"corpus too small for vocab_size {vocab_size}: the tokenizer trainer can make at most "
                f"{m.group(1)} pieces from it; use more text or a smaller model.vocab_size"
            )
        m = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", msg)
        if m:
            return UserError(
                f"vocab_size {vocab_size} is too small for this corpus: the characters of 98% of its "
                f"text plus byte fallback need at least {m.group(2)} pieces"
            )
        if "sentences_.empty()" in msg:
            return UserError("no text to train the tokenizer on")
        return UserError(f"tokenizer training failed: {msg.splitlines()[0] if msg else 'unknown error'}")

    @classmethod
    def load(cls, path: str) -> "Tokenizer | JsonTokenizer":
        """Loads a ``.model`` file, or a Hugging Face ``tokenizer.json`` (a
        :class:`~mixers_jax.data.tokenizer_json.JsonTokenizer`, same methods). UserError if it is
        missing or neither."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"cannot read tokenizer model {path}: {e.strerror or e}") from None
        return JsonTokenizer(data, name=path) if looks_like_json(data) else cls(data, name=path)

    @classmethod
    def from_serialized(cls, data: bytes) -> "Tokenizer | JsonTokenizer":
        """Rebuilds a tokenizer from :meth:`serialized` bytes (e.g. stored in a checkpoint): a
        sentencepiece proto or tokenizer.json bytes."""
        if looks_like_json(data):
            return JsonTokenizer(data, name="<serialized>")
        return cls(data, name="<serialized>")

    # ---------------------------------------------------------------------------------------------
    # Use

    def _encode_with_meta(self, text: str) -> list[int]:
        parts = text.split(_META)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i:
                ids.extend(self._meta_ids)
            if part:
                ids.extend(self._sp.encode(part))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS. UserError on a lone surrogate (not valid Unicode)."""
        try:
            if _META in text:
                return self._encode_with_meta(text)
            return self._sp.encode(text)
        except (UnicodeEncodeError, RuntimeError):
            check_unicode(text)
            raise

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, using a few threads."""
        texts = list(texts)
        plain = [i for i, t in enumerate(texts) if _META not in t]
        out: list[list[int]] = [[] for _ in texts]
        if plain:
            try:
                encoded = self._sp.encode([texts[i] for i in plain], num_threads=_num_threads())
            except (UnicodeEncodeError, RuntimeError):
                for i in plain:
                    check_unicode(texts[i])
                raise
            for i, ids in zip(plain, encoded):
                out[i] = ids
        for i, t in enumerate(texts):
            if _META in t:
                out[i] = self.encode(t)
        return out

    def decode(self, ids) -> str:
        """Text of ``ids`` (control ids such as EOS decode to nothing)."""
        ids = [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))
