"""The package's import structure: every module sits in one layer and imports only lower layers
(or its own layer), there is no import cycle, cli.py imports nothing of the package but errors, and
function-local imports are kept for the cases the README's "Layout" section allows (heavy optional
dependencies; anything in command-line modules, so that ``--help`` stays fast).

The layer map below is the one the README's "Layout" section shows; a new module must be added
to both (the tests name any module missing from either).
"""
import ast
import os
import re

import pytest

from tests_util import REPO

PACKAGE = "mixers_jax"

# Lowest first. A module may import modules of its own layer or of any layer below it.
LAYERS = {
    "base": ["__init__", "errors", "fileio", "cli"],
    "config": ["config"],
    "data and models": ["data", "data.chunking", "data.embedded", "data.sources", "data.token_table",
                        "data.tokenizer_json",
                        "data.tokenizer",
                        "data.passages", "data.pipeline", "data.pairs", "models", "models.*",
                        "sharding"],
    "training parts": ["attribution", "objectives", "metrics", "ranking", "target_bytes",
                       "checkpoint", "lock", "flops"],
    "training setup": ["steps", "curriculum", "recovery", "workdir"],
    "trainer": ["trainer"],
    "tools": ["environment", "compile_log", "evaluation", "generation", "structure",
              "arithmetic_coder", "codec_lanes", "codec", "curves", "benchmarks", "profiling",
              "retrieval", "retrieval.*", "search_index", "matching", "figures", "inversion",
              "entropy", "probes", "experiments", "sweep_runner", "results_page", "hf_llama"],
    "commands": ["train", "evaluate", "generate", "compress", "inspect", "plot", "profile",
                 "bench", "search", "probe", "sweep", "hf"],
}
# Function-local imports are allowed for these top-level packages anywhere ...
LAZY_OK = {"matplotlib", "pyarrow", "tensorboardX", "bm25s"}
# ... and for anything inside the command-line modules (keeps --help fast).
COMMANDS = set(LAYERS["commands"])


def _modules() -> dict[str, str]:
    root = os.path.join(REPO, PACKAGE)
    out = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), root)[:-3].replace(os.sep, ".")
                if rel == "__init__":
                    name = "__init__"  # the package itself (its version)
                elif rel.endswith(".__init__"):
                    name = rel[: -len(".__init__")]
                else:
                    name = rel
                out[name] = os.path.join(folder, f)
    return out


def _layer_of(name: str) -> int:
    for i, members in enumerate(LAYERS.values()):
        for m in members:
            if m == name or (m.endswith(".*") and name.startswith(m[:-1])):
                return i
    raise KeyError(name)


def _imports(path: str, name: str):
    """(imported module, lineno, function-local?) for every import of the file."""
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    is_pkg = path.endswith("__init__.py")
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def local(node):
        p = parents.get(node)
        while p is not None:
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return True
            p = parents.get(p)
        return False

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, local(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = [] if name == "__init__" else name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([PACKAGE] + base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [mod]
            if mod == PACKAGE or mod.startswith(PACKAGE + "."):
                targets = [f"{mod}.{a.name}" for a in node.names]  # 'from pkg import module'
            for t in targets:
                yield t, node.lineno, local(node)


def _internal(target: str, modules) -> str | None:
    if not (target == PACKAGE or target.startswith(PACKAGE + ".")):
        return None
    parts = target.split(".")[1:]
    if not parts:
        return "__init__"
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts = parts[:-1]
    return None


def _graph():
    modules = _modules()
    edges = {}
    for name, path in modules.items():
        edges[name] = [(t, line, lazy) for t, line, lazy in _imports(path, name)]
    return modules, edges


def test_every_module_has_a_layer():
    modules, _ = _graph()
    missing = []
    for name in modules:
        try:
            _layer_of(name)
        except KeyError:
            missing.append(name)
    assert not missing, f"add these modules to LAYERS (and to the README layout): {missing}"


def test_imports_point_downward():
    modules, edges = _graph()
    upward = []
    for name, imports in edges.items():
        for target, line, _ in imports:
            dep = _internal(target, modules)
            if dep is None or dep == name:
                continue
            if _layer_of(dep) > _layer_of(name):
                upward.append(f"{name}:{line} imports {dep}")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_no_import_cycle():
    modules, edges = _graph()
    graph = {n: sorted({d for t, _, _ in imps if (d := _internal(t, modules)) and d != n})
             for n, imps in edges.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    for n in graph:
        graph[n] = [d for d in graph[n] if not n.startswith(d + ".")]
    state, stack, cycles = {}, [], []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, []):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_function_local_imports_are_justified():
    modules, edges = _graph()
    bad = []
    for name, imports in edges.items():
        if name in COMMANDS:
            continue
        for target, line, lazy in imports:
            if lazy and target.split(".")[0] not in LAZY_OK:
                bad.append(f"{name}:{line} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_cli_helper_imports_only_errors():
    """cli.py is imported by every command before its flags parse: it stays at the bottom."""
    modules, edges = _graph()
    deps = sorted({d for t, _, _ in edges["cli"] if (d := _internal(t, modules))} - {"cli"})
    assert set(deps) <= {"errors"}, f"cli imports {deps}; it may import errors only"


def _readme_layout() -> str:
    text = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    return text[text.index("## Layout"):]


def test_readme_layout_names_every_module():
    layout = _readme_layout()
    modules, _ = _graph()
    missing = []
    for name, path in modules.items():
        rel = os.path.relpath(path, os.path.join(REPO, PACKAGE)).replace(os.sep, "/")
        if not re.search(rf"(?<![\w/.]){re.escape(rel)}\b", layout):
            missing.append(rel)
    assert not missing, f"the README's Layout section does not name: {missing}"


def test_the_checks_catch_violations(tmp_path, monkeypatch):
    """The checks themselves can fail: an upward import and a cycle in a fake package."""
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from mixers_jax import config\n")
    (pkg / "config.py").write_text("from mixers_jax import errors\n")
    (pkg / "fileio.py").write_text("def f():\n    import jax\n")
    (pkg / "cli.py").write_text("from mixers_jax import fileio\n")
    (tmp_path / "README.md").write_text("## Layout\nerrors.py config.py fileio.py\n")
    monkeypatch.setitem(globals(), "REPO", str(tmp_path))
    with pytest.raises(AssertionError, match="upward"):
        test_imports_point_downward()
    with pytest.raises(AssertionError, match="cycles"):
        test_no_import_cycle()
    with pytest.raises(AssertionError, match="fileio:2 imports jax inside a function"):
        test_function_local_imports_are_justified()
    with pytest.raises(AssertionError, match="cli imports"):
        test_cli_helper_imports_only_errors()
    with pytest.raises(AssertionError, match="cli.py"):
        test_readme_layout_names_every_module()
