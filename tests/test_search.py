"""``python -m mixers_jax.search``: index + query round trips with a (randomly initialised) trained-
looking run, the model fingerprint, and bad input as one line with status 2 and nothing written."""
import json
import os

import pytest

from mixers_jax import search
from run_util import make_workdir

PASSAGES = [
    "Return the number of items in a container.",
    "Open file and return a corresponding file object.",
    "Convert a number or string to an integer, or return 0 if no arguments are given.",
    "Return a new sorted list from the items in iterable.",
    "Print objects to the text stream file, separated by sep and followed by end.",
    "Create a new dictionary with keys from iterable and values set to value.",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("search_runs")
    return make_workdir(str(root / "a"), seed=0), make_workdir(str(root / "b"), seed=1)


def _run(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        search.run_command(["search", *argv])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def _corpus(tmp_path) -> str:
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(PASSAGES) + "\n", encoding="utf-8")
    return str(path)


def test_index_then_query_returns_the_exact_passage(tmp_path, capsys, runs):
    corpus, index, out = _corpus(tmp_path), str(tmp_path / "idx"), str(tmp_path / "hits.json")
    code, stdout, stderr = _run(capsys, "index", f"--workdir={runs[0]}", f"--corpus={corpus}",
                                f"--index={index}", "--batch_size=4")
    assert code == 0, stderr
    assert "indexed 6 passages x 32" in stdout and "indexed 4/6 passages" in stderr
    meta = json.load(open(os.path.join(index, "index.json")))
    assert meta["model"]["workdir"] == os.path.abspath(runs[0]) and meta["passages"] == 6
    queries = tmp_path / "q.txt"
    queries.write_text(f"{PASSAGES[2]}\n\n{PASSAGES[4]}\n", encoding="utf-8")
    code, stdout, stderr = _run(capsys, "query", f"--index={index}", f"--queries={queries}",
                                "--top_k=2", f"--out={out}")
    assert code == 0, stderr
    result = json.load(open(out))["results"]
    assert [r["hits"][0]["text"] for r in result] == [PASSAGES[2], PASSAGES[4]]
    assert [r["hits"][0]["passage"] for r in result] == [2, 4]
    assert all(r["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4) for r in result)
    assert "ms per query" in stdout
    code, stdout, _ = _run(capsys, "index", f"--workdir={runs[0]}", f"--corpus={corpus}",
                           f"--index={index}")
    assert code == 0 and "is up to date" in stdout


def test_jsonl_corpus_query_from_the_command_line(tmp_path, capsys, runs):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"doc": p}) + "\n" for p in PASSAGES), encoding="utf-8")
    index = str(tmp_path / "idx")
    assert _run(capsys, "index", f"--workdir={runs[0]}", f"--corpus={corpus}", f"--index={index}",
                "--text_field=doc")[0] == 0
    code, stdout, _ = _run(capsys, "query", f"--index={index}", f"--query={PASSAGES[5]}", "--top_k=1")
    assert code == 0 and f"1. 1.0000  [passage 5, byte " in stdout


def test_index_of_another_model_is_one_line_and_rebuild_is_detected(tmp_path, capsys, runs):
    corpus, index, out = _corpus(tmp_path), str(tmp_path / "idx"), str(tmp_path / "o.json")
    assert _run(capsys, "index", f"--workdir={runs[0]}", f"--corpus={corpus}", f"--index={index}")[0] == 0
    code, stdout, stderr = _run(capsys, "query", f"--index={index}", f"--workdir={runs[1]}",
                                "--query=file", f"--out={out}")
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1
    assert "was built by another model" in stderr and not os.path.exists(out)
    code, stdout, _ = _run(capsys, "index", f"--workdir={runs[1]}", f"--corpus={corpus}",
                           f"--index={index}")
    assert code == 0 and "rebuilt" in stdout and "the model changed" in stdout
    assert _run(capsys, "query", f"--index={index}", f"--workdir={runs[1]}", "--query=file")[0] == 0


@pytest.mark.parametrize("name, content, extra, message", [
    ("c.jsonl", b'{"text": "a passage"}\n{"body": "no text field"}\n', [], "c.jsonl:2: no field 'text'"),
    ("c.txt", b"", [], "has no passages"),
    ("c.txt", b"caf\xe9\n\n\xff\xfe\n", [], "has no passages (2 skipped as non-UTF-8"),
    ("c.txt", b"a passage\n", ["--format=csv"], "--format"),
])
def test_bad_corpus_is_one_line_status_2_nothing_written(tmp_path, capsys, runs, name, content,
                                                         extra, message):
    corpus = tmp_path / name
    corpus.write_bytes(content)
    code, _, stderr = _run(capsys, "index", f"--workdir={runs[0]}", f"--corpus={corpus}",
                           f"--index={tmp_path / 'idx'}", *extra)
    assert code == 2 and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert message in stderr
    assert sorted(os.listdir(tmp_path)) == [name]


def test_non_utf8_passages_are_skipped_and_counted(tmp_path, capsys, runs):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(PASSAGES[0].encode() + b"\n\ncaf\xe9 au lait\n\n" + PASSAGES[1].encode())
    code, stdout, _ = _run(capsys, "index", f"--workdir={runs[0]}", f"--corpus={corpus}",
                           f"--index={tmp_path / 'idx'}")
    assert code == 0 and "indexed 2 passages" in stdout and "skipped 1 non-UTF-8" in stdout


@pytest.mark.parametrize("argv, message", [
    (["find", "--index=IDX"], "unknown action 'find'"),
    (["query", "--index=IDX"], "exactly one of --query=TEXT and --queries=FILE"),
    (["query", "--index=IDX/missing", "--query=x"], "does not exist"),
    (["index", "--index=IDX/new"], "index needs --workdir"),
])
def test_bad_arguments_are_one_line_status_2(tmp_path, capsys, argv, message):
    argv = [a.replace("IDX", str(tmp_path)) for a in argv]
    code, _, stderr = _run(capsys, *argv)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr, stderr
