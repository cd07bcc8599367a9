"""The package's import graph, read from the source with ``ast``: imports flow one way, privates stay private.

Stages depend downwards only: data -> decoding (the package of decoders and backends under every stage) ->
generate -> identify -> train -> evaluate -> experiment -> report (``STAGES``), with ``FOUNDATION`` (artifacts,
models, verify, the shared decoding pieces and Stage B's protocol, ...) below them all and cli on top.
Both module-level and function-local imports count as edges: a cycle hidden behind an import inside a
function is still a cycle.

Rule for function-local imports of ``cft`` modules: one is allowed only where it keeps a light module light,
i.e. the importing module does not (at module level, through any ``cft`` module) import a heavy library
(``HEAVY``: torch, transformers, trl, ...) and the imported module does. That keeps ``cft --help``, record
reading and the HTML viewer fast. Every other import belongs at the top of the module; heavy third-party
libraries may always be imported inside functions.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
HEAVY = {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "math_verify", "sympy", "matplotlib",
         "gguf", "safetensors", "tokenizers", "huggingface_hub", "deepspeed", "numpy"}
# Light sub-modules of heavy packages: importing them loads neither torch nor the model code (checked by
# test_light_submodules_are_light), e.g. the argument parser every command's parser is built on.
LIGHT = {"transformers.hf_argparser"}

# Edges left out of the cycle check because other changes of this round remove them (engine imports the
# protocol, Work and finish_branch from identify; they move to a module both import, with generate's stop rule).
# The lead empties these lists after merging; test_known_entries_still_exist fails on an entry gone stale.
KNOWN_CYCLES_BEING_FIXED: list[tuple[str, str]] = []
KNOWN_PRIVATE_IMPORTS_BEING_FIXED: list[tuple[str, str, str]] = []
# Function-local imports against the rule above, in modules that other changes of this round edit
# (cli.py: the parser conversion; identify.py: the cycle above); the lead hoists them after merging.
KNOWN_LAZY_IMPORTS_BEING_FIXED: list[tuple[str, str]] = []


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str
    name: str | None  # the name taken from the module (``from m import name``), None for ``import m``
    local: bool  # inside a function
    line: int

    def where(self) -> str:
        return f"{self.importer}:{self.line}"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((SRC / "cft").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _modules()


def _owner(dotted: str) -> str | None:
    """The longest prefix of ``dotted`` that is a cft module (``cft.verify.grade`` -> ``cft.verify``)."""
    while dotted and dotted not in MODULES:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _parse(module: str) -> tuple[ast.Module, set[int]]:
    """The module's tree and the ids of the nodes inside functions."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    local = {id(n) for fn in ast.walk(tree) if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
             for n in ast.walk(fn) if n is not fn}
    return tree, local


def _scan(module: str) -> tuple[list[Edge], set[str], list[str]]:
    """(edges to cft modules, third-party packages imported at module level, private-attribute uses)."""
    tree, local = _parse(module)
    edges, third_party, aliases = [], set(), {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top != "cft":
                    if id(node) not in local:
                        third_party.add(top)
                    continue
                edges.append(Edge(module, _owner(alias.name), None, id(node) in local, node.lineno))
                aliases[alias.asname or top] = alias.name if alias.asname else top  # import a.b binds a
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            if base.split(".")[0] != "cft":
                if id(node) not in local and base not in LIGHT:
                    third_party.add(base.split(".")[0])
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in MODULES:
                    edges.append(Edge(module, sub, None, id(node) in local, node.lineno))
                    aliases[alias.asname or alias.name] = sub
                else:
                    edges.append(Edge(module, _owner(base), alias.name, id(node) in local, node.lineno))
    private = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            dotted = _dotted(node.value)
            if dotted is not None and dotted.split(".")[0] in aliases:
                head, _, rest = dotted.partition(".")
                target = ".".join(filter(None, [aliases[head], rest]))
                if target in MODULES and target != module:
                    private.append(f"{module}:{node.lineno} uses {target}.{node.attr}")
    return [e for e in edges if e.imported != module], third_party, private


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _dotted(node.value)
        return None if inner is None else f"{inner}.{node.attr}"
    return None


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


SCANS = {m: _scan(m) for m in MODULES}
EDGES = [e for edges, _, _ in SCANS.values() for e in edges]


def _heavy() -> dict[str, bool]:
    """Modules whose import, at module level and through cft modules, imports a heavy library."""
    direct = {m: bool(third & HEAVY) for m, (_, third, _) in SCANS.items()}
    heavy = dict(direct)
    changed = True
    while changed:
        changed = False
        for e in EDGES:
            if not e.local and heavy[e.imported] and not heavy[e.importer]:
                heavy[e.importer] = changed = True
    return heavy


def find_cycle(edges: list[Edge]) -> list[Edge] | None:
    """One cycle of the graph as its edges, or None."""
    graph: dict[str, list[Edge]] = {}
    for e in edges:
        graph.setdefault(e.importer, []).append(e)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[Edge] = []

    def visit(node: str) -> list[Edge] | None:
        state[node] = 1
        for e in graph.get(node, []):
            if state.get(e.imported) == 1:
                start = next((i for i, p in enumerate(path) if p.importer == e.imported), len(path))
                return [*path[start:], e]
            if e.imported not in state:
                path.append(e)
                found = visit(e.imported)
                if found:
                    return found
                path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_source():
    """The scanner sees what it must: function-local and relative imports, and stage order."""
    pairs = {(e.importer, e.imported) for e in EDGES}
    assert ("cft.generate", "cft.data") in pairs and ("cft.verify.grading", "cft.verify.extract") in pairs
    assert any(e.local for e in EDGES if e.importer == "cft.options")  # models, lazily: a fast `cft --help`
    assert find_cycle([Edge("a", "b", None, False, 1), Edge("b", "c", None, True, 2), Edge("c", "a", "x", False, 3)])
    assert find_cycle([Edge("a", "b", None, False, 1), Edge("a", "c", None, False, 2)]) is None
    heavy = _heavy()
    assert heavy["cft.train"] and heavy["cft.models"] and not heavy["cft.artifacts"] and not heavy["cft.verify"]


def test_imports_form_no_cycle():
    known = set(KNOWN_CYCLES_BEING_FIXED)
    cycle = find_cycle([e for e in EDGES if (e.importer, e.imported) not in known])
    assert cycle is None, "import cycle: " + " -> ".join(
        f"{e.importer} ({'in a function, ' if e.local else ''}line {e.line}, {e.name or 'module'})" for e in cycle
    ) + f" -> {cycle[-1].imported}"


# The pipeline's order; a module may reach (import, directly or not) only modules of its own or earlier stages.
DECODING = ["cft.decoding.api", "cft.decoding.audit", "cft.decoding.backends", "cft.decoding.drafting",
            "cft.decoding.engine", "cft.decoding.fast", "cft.decoding.hf", "cft.decoding.reference",
            "cft.decoding.rowcache"]
STAGES = [["cft.data"], DECODING, ["cft.generate"], ["cft.identify"], ["cft.train"], ["cft.evaluate"],
          ["cft.grid", "cft.aggregation", "cft.experiment"], ["cft.report"]]
# What every stage builds on: none of these reaches any stage.
FOUNDATION = ["cft.artifacts", "cft.fingerprints", "cft.models", "cft.prompts", "cft.problem", "cft.verify",
              "cft.zoo", "cft.config", "cft.decoding", "cft.protocol", "cft.answer_watch", "cft.errors", "cft.kinds"]


def _reachable(module: str) -> set[str]:
    graph: dict[str, set[str]] = {}
    for e in EDGES:
        graph.setdefault(e.importer, set()).add(e.imported)
    seen, todo = set(), [module]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_stages_import_only_earlier_stages():
    bad = []
    for i, stage in enumerate(STAGES):
        later = {m for s in STAGES[i + 1 :] for m in s}
        bad += [f"{m} reaches {sorted(_reachable(m) & later)}" for m in stage if _reachable(m) & later]
    stages = {m for s in STAGES for m in s}
    bad += [f"{m} reaches {sorted(_reachable(m) & stages)}" for m in FOUNDATION if _reachable(m) & stages]
    assert not bad, "\n".join(bad)


def test_known_entries_still_exist():
    """An entry of a known-cycles list that no longer matches anything must go, so the lists only shrink."""
    pairs = {(e.importer, e.imported) for e in EDGES}
    assert set(KNOWN_CYCLES_BEING_FIXED) <= pairs, set(KNOWN_CYCLES_BEING_FIXED) - pairs
    private = {(e.importer, e.imported, e.name) for e in EDGES}
    assert set(KNOWN_PRIVATE_IMPORTS_BEING_FIXED) <= private
    lazy = {(e.importer, e.imported) for e in EDGES if e.local}
    assert set(KNOWN_LAZY_IMPORTS_BEING_FIXED) <= lazy, set(KNOWN_LAZY_IMPORTS_BEING_FIXED) - lazy


def test_no_module_imports_a_private_name_of_another():
    known = set(KNOWN_PRIVATE_IMPORTS_BEING_FIXED)
    bad = [f"{e.where()} imports {e.imported}.{e.name}" for e in EDGES
           if e.name and _is_private(e.name) and (e.importer, e.imported, e.name) not in known]
    bad += [use for _, _, private in SCANS.values() for use in private]
    assert not bad, "private names used across modules (make them public or move them):\n" + "\n".join(bad)


def test_function_local_imports_only_keep_light_modules_light():
    heavy = _heavy()
    known = set(KNOWN_LAZY_IMPORTS_BEING_FIXED)
    bad = sorted({f"{e.where()} imports {e.imported} inside a function" for e in EDGES
                  if e.local and (heavy[e.importer] or not heavy[e.imported])
                  and (e.importer, e.imported) not in known})
    assert not bad, "move these imports to the top of the module (see this file's doc):\n" + "\n".join(bad)


def test_light_submodules_are_light():
    import subprocess
    import sys

    for name in LIGHT:
        code = f"import sys, {name}; print(sorted(m for m in ('torch', 'trl', 'peft') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]", f"{name} imports {out.strip()}"


MAX_CLASS_LINES = 250  # a class longer than this does several jobs: split it by concern (issue 29)


def test_no_class_is_longer_than_250_lines():
    long = [f"{m}.{n.name}: {n.end_lineno - n.lineno + 1} lines" for m in MODULES for n in ast.walk(_parse(m)[0])
            if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > MAX_CLASS_LINES]
    assert not long, "classes over 250 lines:\n" + "\n".join(long)


def test_no_global_statement_in_the_decoders():
    """A decoder's statistics leave through its return value, never through module state."""
    decoding = [m for m in MODULES if m.startswith("cft.decoding")]
    assert set(DECODING) < set(decoding)
    bad = [f"{m}:{n.lineno}" for m in decoding for n in ast.walk(_parse(m)[0]) if isinstance(n, ast.Global)]
    assert not bad, "global statements: " + ", ".join(bad)


# (module imported, modules it must not load): the light paths a newcomer runs without the heavy stages
LOADS = [("cft.report", ("trl",)), ("cft.selection", ("cft.decoding.engine", "cft.identify")),
         ("cft.evaluate", ("cft.generate",))]


def test_modules_do_not_load_what_they_do_not_need():
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for module, banned in LOADS:
        code = f"import sys, {module}; print(sorted(m for m in {banned!r} if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
        assert out.strip() == "[]", f"import {module} loads {out.strip()}"
