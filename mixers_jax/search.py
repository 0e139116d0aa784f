"""Search your own documents with a trained model: ``python -m mixers_jax.search index|query ...``.

Build an index once (docs/search.md), then query it:

    python -m mixers_jax.search index --workdir=RUN --corpus=FILE --index=DIR
        [--format=auto|jsonl|text] [--text_field=text] [--split=paragraph|line] [--batch_size=64]
    python -m mixers_jax.search query --index=DIR --query="..." | --queries=FILE
        [--workdir=RUN] [--top_k=5] [--out=FILE.json]

``index`` embeds every passage of the corpus file with the run's model (its embedding position and
padding come from the run's config) into DIR: unit-normalised float32 embeddings (memory-mapped),
each passage's byte span in the corpus file, and ``index.json``, the fingerprint of the model
(parameters, tokenizer, model config) and of the corpus (path, size, sha256, format, field, split).
A JSONL corpus gives one passage per line (the ``--text_field`` string); a text corpus one passage
per blank-line-separated paragraph (``--split=line``: per line). Passages whose bytes are not valid
UTF-8 are skipped and counted; empty ones are skipped too. A progress line goes to stderr per batch.
Rerunning ``index`` on an existing index does nothing if the fingerprint is unchanged and rebuilds
it (and says why) when the model or the corpus changed. The index is written into a temporary
folder and renamed into place: it is whole or absent.

``query`` embeds each query (``--query``, or ``--queries``: a UTF-8 file, one query per line, blank
lines ignored) with the model (default: the workdir recorded in the index) and prints the ``--top_k``
passages with their cosine similarity and the time per query (embedding and scoring, after the
embedding function has been compiled once); ``--out`` also writes them as JSON (atomically). An index
built by another model, or whose corpus file changed since, is refused in one line.

Exit status as in mixers_jax/cli.py: 0 done; 2 bad input (missing field, bad JSON, empty corpus,
another model's index, ...), one ``error:`` line, nothing written.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

from absl import flags
from absl import logging as absl_logging

from mixers_jax import cli
from mixers_jax.errors import UserError
from mixers_jax.fileio import read_bytes, write_atomic

ACTIONS = ("index", "query")

FLAGS = cli.flag_values()
_WORKDIR = flags.DEFINE_string("workdir", None, "Trained run whose model embeds the texts (query: "
                               "default the run recorded in the index).", flag_values=FLAGS)
_INDEX = flags.DEFINE_string("index", None, "Index folder.", flag_values=FLAGS)
_CORPUS = flags.DEFINE_string("corpus", None, "index: the corpus file (JSONL or text).",
                              flag_values=FLAGS)
_FORMAT = flags.DEFINE_enum("format", "auto", ["auto", "jsonl", "text"], "index: corpus format "
                            "(auto: .jsonl/.json is JSONL, anything else text).", flag_values=FLAGS)
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "index: the JSONL field holding the passage.",
                                  flag_values=FLAGS)
_SPLIT = flags.DEFINE_enum("split", "paragraph", ["paragraph", "line"], "index: text corpora are cut "
                           "at blank lines (paragraph) or at every line.", flag_values=FLAGS)
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Texts embedded per batch.", lower_bound=1,
                                   flag_values=FLAGS)
_QUERY = flags.DEFINE_string("query", None, "query: one query text.", flag_values=FLAGS)
_QUERIES = flags.DEFINE_string("queries", None, "query: a UTF-8 file of queries, one per line.",
                               flag_values=FLAGS)
_TOP_K = flags.DEFINE_integer("top_k", 5, "query: passages returned per query.", lower_bound=1,
                              flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "query: also write the results as JSON to this file.",
                           flag_values=FLAGS)
_SHOW = flags.DEFINE_integer("show_chars", 240, "query: characters of each passage printed "
                             "(0: all).", lower_bound=0, flag_values=FLAGS)


def _read_queries() -> list[str]:
    if bool(_QUERY.value) == bool(_QUERIES.value):
        raise UserError("query needs exactly one of --query=TEXT and --queries=FILE")
    if _QUERY.value:
        return [_QUERY.value]
    try:
        text = read_bytes(_QUERIES.value).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"--queries={_QUERIES.value} is not UTF-8 (byte {e.start})") from None
    queries = [q.strip() for q in text.splitlines() if q.strip()]
    if not queries:
        raise UserError(f"--queries={_QUERIES.value} holds no query")
    return queries


def _index(open_embedder) -> None:
    from mixers_jax import search_index

    for name, flag in (("workdir", _WORKDIR), ("corpus", _CORPUS)):
        if not flag.value:
            raise UserError(f"index needs --{name}")
    corpus = search_index.CorpusSpec(_CORPUS.value, _FORMAT.value, _TEXT_FIELD.value, _SPLIT.value)
    corpus.resolved()  # a missing corpus is reported before the model loads
    embedder = open_embedder(_WORKDIR.value, _BATCH_SIZE.value)
    meta = search_index.build(_INDEX.value, embedder, corpus, batch_size=_BATCH_SIZE.value)
    folder = os.path.abspath(_INDEX.value)
    skipped = (f"; skipped {meta['skipped_non_utf8']} non-UTF-8 and {meta['skipped_empty']} empty "
               "passages")
    if meta["action"] == "up_to_date":
        print(f"index {folder} is up to date ({meta['passages']} passages; same model and corpus)")
        return
    if meta["action"] == "rebuilt":
        print(f"rebuilt {folder}: {'; '.join(meta['changes'])}")
    print(f"indexed {meta['passages']} passages x {meta['dim']} in {meta['build_seconds']:.1f} s "
          f"({meta['passages_per_second']:.1f} passages/s){skipped}; index {folder}")


def _clip(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if not n or len(text) <= n else text[: n - 1] + "…"


def _query(open_embedder) -> None:
    from mixers_jax import search_index

    queries = _read_queries()
    out = _OUT.value
    if out and os.path.isdir(out):
        raise UserError(f"--out={out} is a folder; give a file name")
    meta = search_index.open_index(_INDEX.value).meta  # not an index: refused before the model loads
    workdir = _WORKDIR.value or meta["model"].get("workdir")
    if not workdir:
        raise UserError("the index records no workdir; give --workdir")
    embedder = open_embedder(workdir, min(_BATCH_SIZE.value, len(queries)))
    index = search_index.open_index(_INDEX.value, embedder)
    t0 = time.time()
    embedder.embed_texts(queries[:1])  # compiles the embedding (once per process)
    compile_s = time.time() - t0
    t0 = time.time()
    hits = index.search(embedder, queries, _TOP_K.value)
    seconds = time.time() - t0
    results = []
    for query, rows in zip(queries, hits):
        print(f"query: {query}")
        for h in rows:
            print(f"  {h.rank:>2}. {h.score:.4f}  [passage {h.passage}, byte {h.start}]  "
                  f"{_clip(h.text, _SHOW.value)}")
        results.append({"query": query, "hits": [h.__dict__ for h in rows]})
    print(f"{len(queries)} queries over {len(index.embeddings)} passages in {seconds:.3f} s "
          f"({1e3 * seconds / len(queries):.1f} ms per query: embedding in batches of "
          f"{embedder.embedder.batch_size} and scoring; compiling the embedding took "
          f"{compile_s:.1f} s before)")
    if out:
        write_atomic(out, json.dumps({"index": index.folder, "model": index.meta["model"],
                                      "top_k": _TOP_K.value, "seconds": seconds,
                                      "compile_seconds": compile_s,
                                      "results": results}, indent=2, ensure_ascii=False))
        print(f"wrote {out}")


def main(argv: list[str]) -> None:
    action = argv[1]
    if action not in ACTIONS:
        raise UserError(f"unknown action {action!r}; choose {' or '.join(ACTIONS)}")
    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax reports every file it reads at INFO
    logging.getLogger("absl").setLevel(logging.ERROR)
    from mixers_jax.search_index import open_embedder  # jax and the model: loaded after --help

    (_index if action == "index" else _query)(open_embedder)


def run_command(argv: Sequence[str] | None = None) -> None:
    """``python -m mixers_jax.search``; exit status as in mixers_jax/cli.py."""
    cli.run(main, FLAGS, doc=__doc__, argv=argv, positional=("action",), required=("index",))


if __name__ == "__main__":
    run_command()
