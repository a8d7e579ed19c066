"""The package's layering, checked from the source with ``ast`` (nothing is imported).

Imports go only DOWN the table :data:`LAYERS` (rank 0 first). For every module of ``jaxpersona``
the checker collects each package-internal import — at module level, inside functions, and string
module names (``importlib.import_module("jaxpersona.x")`` or a table of ``"jaxpersona.x.y"``
strings) — and reports:

* an import **cycle** between modules (any import counts, lazy or not);
* an **upward** import (a module of a higher rank), or a **sideways** one (same rank, another
  layer: ``errors``/``version``, ``report``/``serve`` and ``__init__``/``__main__`` do not import
  each other);
* a **private reach-in**: ``from x import _y`` or ``x._y`` where ``x`` is another module;
* a package-internal **import inside a function** without a ``lazy:`` comment on that line (or the
  line above) saying why. The CLI may instead load its commands through one table: its in-function
  imports are then all inside ONE function;
* a module that is not in the table, and an allow-list entry that is no longer needed.

``pytest -s tests/test_layering.py`` prints the summary (modules per layer, edges, violations).
"""

from __future__ import annotations

import ast
import dataclasses
from collections import Counter, defaultdict
from pathlib import Path

PACKAGE = "jaxpersona"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# The layer order, declared once (the README quotes it). Key: a subpackage or a top-level module of
# the package (``__init__`` = the package itself); value: its rank. A module may import only modules
# of a LOWER rank, or modules of its own layer.
LAYERS: dict[str, int] = {
    "errors": 0,
    "version": 0,
    "model": 1,
    "data": 2,
    "artifacts": 3,
    "edit": 4,
    "compute": 5,
    "measure": 6,
    "runner": 7,
    "pipelines": 8,
    "report": 9,
    "serve": 9,
    "cli": 10,
    "__init__": 11,
    "__main__": 11,
}

# Known debt, one entry per module allowed to import inside functions without ``lazy:`` comments
# (the checker reports an entry as stale once it is unused). None left: jaxpersona/cli.py loads its
# commands' modules through one table (``LIBRARY``, imported in one function).
ALLOW_IN_FUNCTION_IMPORTS: dict[str, str] = {}

# The module whose in-function imports may instead all sit in one function (the lazy command table).
ONE_TABLE_MODULES = ("cli",)


@dataclasses.dataclass(frozen=True)
class Edge:
    """One package-internal import: ``src`` imports ``dst`` at ``line`` (``kind``: top | function | dynamic)."""

    src: str
    dst: str
    line: int
    kind: str
    func: str = ""  # the outermost enclosing function, for in-function imports


@dataclasses.dataclass
class Source:
    """One module: its dotted name, layer key, syntax tree and source lines."""

    name: str
    path: Path
    key: str
    tree: ast.Module
    lines: list[str]

    @property
    def package(self) -> str:
        """The package relative imports resolve against (a package's ``__init__`` is its own package)."""
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


@dataclasses.dataclass
class Report:
    """What the checker found: the modules, the import edges and the violations (one line each)."""

    package: str
    layers: dict[str, int]
    modules: dict[str, Source]
    edges: list[Edge]
    violations: list[str]

    def summary(self) -> str:
        """Modules per layer, edge counts (by kind and between layers), then the violations."""
        by_key: dict[str, list[str]] = defaultdict(list)
        for m in self.modules.values():
            by_key[m.key].append(m.name.removeprefix(self.package).lstrip(".") or "(package)")
        out = [f"{self.package}: {len(self.modules)} modules, {len(self.edges)} internal imports "
               f"({dict(Counter(e.kind for e in self.edges))})", "modules per layer:"]
        for key in sorted(by_key, key=lambda k: (self.layers.get(k, 99), k)):
            out.append(f"  {self.layers.get(key, '?')!s:>2} {key:<10} {len(by_key[key]):>3}: "
                       + ", ".join(sorted(by_key[key])))
        pairs = Counter((self.modules[e.src].key, self.modules[e.dst].key) for e in self.edges)
        out.append("edges between layers (importer -> imported: count):")
        for key in sorted(by_key, key=lambda k: (self.layers.get(k, 99), k)):
            row = [f"{d}:{n}" for (s, d), n in sorted(pairs.items(), key=lambda p: self.layers.get(p[0][1], 99))
                   if s == key]
            out.append(f"  {key:<10} -> " + (", ".join(row) or "-"))
        out.append(f"violations ({len(self.violations)}):")
        out.extend(f"  {v}" for v in self.violations)
        return "\n".join(out)


def scan(root: Path, package: str) -> dict[str, Source]:
    """Parse every ``*.py`` under ``root`` (the package directory) into :class:`Source` by dotted name."""
    mods: dict[str, Source] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join((package, *parts))
        key = parts[0] if parts else "__init__"
        text = path.read_text(encoding="utf-8")
        mods[name] = Source(name, path, key, ast.parse(text, filename=str(path)), text.splitlines())
    return mods


def _known(name: str, mods: dict[str, Source]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package (None if outside it)."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in mods:
            return ".".join(parts[:i])
    return None


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


class _Imports(ast.NodeVisitor):
    """Collects one module's internal import edges, the names its imports bind to modules, and its
    private ``from x import _y`` reach-ins."""

    def __init__(self, src: Source, mods: dict[str, Source]) -> None:
        self.src, self.mods = src, mods
        self.edges: list[Edge] = []
        self.bound: dict[str, str] = {}  # local name -> module it refers to
        self.private: list[str] = []
        self.funcs: list[str] = []

    def _edge(self, dst: str, node: ast.AST, kind: str | None = None) -> None:
        if dst != self.src.name:
            where = "function" if self.funcs else "top"
            self.edges.append(Edge(self.src.name, dst, node.lineno, kind or where, self.funcs[0] if self.funcs else ""))

    def _scope(self, node: ast.AST) -> None:
        self.funcs.append(getattr(node, "name", "<lambda>"))
        self.generic_visit(node)
        self.funcs.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _scope

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            dst = _known(alias.name, self.mods)
            if dst is None:
                continue
            self._edge(dst, node)
            if alias.asname:
                self.bound[alias.asname] = dst
            else:
                self.bound[alias.name.split(".")[0]] = alias.name.split(".")[0]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            pkg = self.src.package.split(".")
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        owner = _known(base, self.mods)
        if owner is None:
            return
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            if sub in self.mods:
                self._edge(sub, node)
                self.bound[alias.asname or alias.name] = sub
                continue
            self._edge(owner, node)
            if _private(alias.name) and owner != self.src.name:
                self.private.append(f"{self.src.name}:{node.lineno}: imports private {owner}.{alias.name}")

    def visit_Constant(self, node: ast.Constant) -> None:
        # a module named by a string (importlib.import_module, a lazy command table "pkg.mod:func"); the
        # bare package name is a program / logger / owner name, not an import
        name = node.value.split(":")[0] if isinstance(node.value, str) else ""
        if "." in name and name in self.mods:
            self._edge(name, node, "dynamic")


def _attr_reach_ins(src: Source, bound: dict[str, str], mods: dict[str, Source]) -> list[str]:
    """``x._y`` where ``x`` (a name bound by an import, possibly followed by submodules) is another module."""
    found = []
    for node in ast.walk(src.tree):
        if not isinstance(node, ast.Attribute) or not isinstance(node.ctx, ast.Load):
            continue
        chain: list[str] = []
        cur: ast.expr = node
        while isinstance(cur, ast.Attribute):
            chain.append(cur.attr)
            cur = cur.value
        if not isinstance(cur, ast.Name) or cur.id not in bound or len(chain) > 1 and not _private(chain[0]):
            continue  # only the innermost private attribute of a chain is reported (once)
        mod = bound[cur.id]
        for attr in reversed(chain):
            if f"{mod}.{attr}" in mods:
                mod = f"{mod}.{attr}"
                continue
            if _private(attr) and mod != src.name:
                found.append(f"{src.name}:{node.lineno}: uses private {mod}.{attr}")
            break
    return found


def _cycles(names: list[str], edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        graph[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for start in names:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _lazy_comment(src: Source, node_line: int, end_line: int) -> bool:
    """A ``lazy:`` comment on the import's lines or the line above."""
    lines = src.lines[max(node_line - 2, 0): end_line]
    return any("#" in ln and "lazy:" in ln.split("#", 1)[1] for ln in lines)


def _in_function_violations(src: Source, edges: list[Edge], ends: dict[int, int],
                            one_table: tuple[str, ...]) -> list[str]:
    """In-function internal imports without a ``lazy:`` comment; in a one-table module, imports
    spread over more than one function."""
    inner = [e for e in edges if e.kind == "function"]
    if src.key in one_table:
        funcs = sorted({e.func for e in inner})
        if len(funcs) <= 1:
            return []
        return [f"{src.name}: in-function imports spread over {len(funcs)} functions ({', '.join(funcs[:6])}"
                f"{', ...' if len(funcs) > 6 else ''}); load them through one table (one function)"]
    return [f"{src.name}:{e.line}: imports {e.dst} inside {e.func}() without a `lazy:` comment saying why"
            for e in inner if not _lazy_comment(src, e.line, ends.get(e.line, e.line))]


def check(root: Path, package: str, layers: dict[str, int], allow_in_function: dict[str, str] | None = None,
          one_table: tuple[str, ...] = ONE_TABLE_MODULES) -> Report:
    """Check the package under ``root`` against ``layers``; see the module docstring for the rules."""
    allow = allow_in_function or {}
    mods = scan(root, package)
    edges: list[Edge] = []
    bad: list[str] = []
    for src in mods.values():
        if src.key not in layers:
            bad.append(f"{src.name}: layer {src.key!r} is not in the layer table")
            continue
        seen = _Imports(src, mods)
        seen.visit(src.tree)
        # imports and their last lines, for a comment anywhere on a multi-line import
        ends = {n.lineno: n.end_lineno or n.lineno for n in ast.walk(src.tree) if isinstance(n, ast.stmt)}
        edges += seen.edges
        bad += seen.private + _attr_reach_ins(src, seen.bound, mods)
        lazy = _in_function_violations(src, seen.edges, ends, one_table)
        if src.name in allow:
            if not lazy:
                bad.append(f"{src.name}: the in-function import allow-list entry is no longer needed: delete it")
        else:
            bad += lazy
    edges = [e for e in edges if mods[e.dst].key in layers]
    for e in sorted(set(edges), key=lambda e: (e.src, e.line, e.dst)):
        ks, kd = mods[e.src].key, mods[e.dst].key
        if ks not in layers:
            continue
        how = {"top": "imports", "function": "imports (in a function)", "dynamic": "names"}[e.kind]
        if layers[kd] > layers[ks]:
            bad.append(f"{e.src}:{e.line}: upward: {ks} (rank {layers[ks]}) {how} {e.dst} ({kd}, rank {layers[kd]})")
        elif layers[kd] == layers[ks] and kd != ks:
            bad.append(f"{e.src}:{e.line}: sideways: {ks} {how} {e.dst} (both rank {layers[ks]}, different layers)")
    for comp in _cycles(sorted(mods), edges):
        bad.append("import cycle: " + " <-> ".join(comp))
    return Report(package, layers, mods, edges, bad)


def test_layering() -> None:
    report = check(ROOT, PACKAGE, LAYERS, ALLOW_IN_FUNCTION_IMPORTS)
    print("\n" + report.summary())
    assert len(report.modules) > 50 and len(report.edges) > 100, "the checker found too little: is ROOT right?"
    assert not report.violations, "layering violations:\n" + "\n".join(report.violations)


def test_table_covers_every_layer() -> None:
    keys = {m.key for m in scan(ROOT, PACKAGE).values()}
    assert keys == set(LAYERS), f"not in LAYERS: {sorted(keys - set(LAYERS))}; no such layer: {sorted(set(LAYERS) - keys)}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


FAKE_LAYERS = {"errors": 0, "model": 1, "compute": 2, "report": 3, "serve": 3, "cli": 4, "__init__": 5}


def _fake_report(tmp_path: Path, files: dict[str, str], allow: dict[str, str] | None = None) -> Report:
    base = {"fake/__init__.py": "", "fake/errors.py": "", "fake/model/__init__.py": "",
            "fake/compute/__init__.py": "", "fake/report.py": "", "fake/serve/__init__.py": "", "fake/cli.py": ""}
    _write(tmp_path, {**base, **files})
    report = check(tmp_path / "fake", "fake", FAKE_LAYERS, allow)
    print("\n" + report.summary())
    return report


def _has(report: Report, *words: str) -> bool:
    return any(all(w in v for w in words) for v in report.violations)


def test_checker_reports_each_kind_of_violation(tmp_path: Path) -> None:
    report = _fake_report(tmp_path, {
        # upward: model (1) -> compute (2); cycle: model.a -> model.b -> model.a
        "fake/model/a.py": "from fake.compute import x\nfrom fake.model import b\n",
        "fake/model/b.py": "import fake.model.a as a\n",
        # private reach-ins: from-import and attribute, both across modules
        "fake/compute/x.py": ("from fake.model.b import _hidden\nfrom fake.model import b as bm\n"
                              "import fake.model.a\n\ndef f():\n    return bm._other(), fake.model.a._deep\n"),
        # in-function imports: one without a lazy: comment (reported), one with (fine)
        "fake/compute/y.py": ("def g():\n    from fake.model import a\n    return a\n\n"
                              "def h():\n    # lazy: a heavy optional dependency\n    from fake.model import b\n"
                              "    return b\n"),
        # sideways (same rank, other layer) and relative upward import
        "fake/report.py": "from fake import serve\n",
        "fake/errors.py": "from . import report\n",
        "fake/stray.py": "",
    })
    assert _has(report, "upward", "fake.model.a", "fake.compute.x")
    assert _has(report, "upward", "fake.errors", "fake.report")
    assert _has(report, "import cycle", "fake.model.a", "fake.model.b")
    assert _has(report, "fake.compute.x:1", "private fake.model.b._hidden")
    assert _has(report, "fake.compute.x:6", "private fake.model.b._other")
    assert _has(report, "fake.compute.x:6", "private fake.model.a._deep")
    assert _has(report, "fake.compute.y:2", "inside g()", "lazy:")
    assert not _has(report, "fake.compute.y:7")
    assert _has(report, "sideways", "fake.report", "fake.serve")
    assert _has(report, "fake.stray", "not in the layer table")
    assert len(report.violations) == 9, report.summary()


def test_checker_one_table_cli_and_stale_allow_list(tmp_path: Path) -> None:
    table = ("COMMANDS = {'x': 'fake.compute.x:run'}\n\ndef command(name):\n    import importlib\n"
             "    from fake.compute import x\n    from fake.model import a\n    return x, a\n")
    files = {"fake/compute/x.py": "", "fake/model/a.py": "", "fake/cli.py": table}
    report = _fake_report(tmp_path, files)
    assert not report.violations
    assert any(e.kind == "dynamic" and e.dst == "fake.compute.x" for e in report.edges)
    # the allow-list entry is stale once the CLI loads through one function
    stale = _fake_report(tmp_path, files, {"fake.cli": "debt"})
    assert _has(stale, "fake.cli", "no longer needed")
    # spread over two functions: reported, unless allow-listed; a dynamic name is rank-checked too
    spread = table + "\ndef other():\n    from fake.model import a\n    return a\n"
    files["fake/cli.py"] = spread
    files["fake/model/a.py"] = "NAME = 'fake.cli'\n"
    report = _fake_report(tmp_path, files)
    assert _has(report, "fake.cli", "2 functions", "one table")
    assert _has(report, "upward", "fake.model.a", "names fake.cli")
    allowed = _fake_report(tmp_path, files, {"fake.cli": "debt"})
    assert not _has(allowed, "2 functions") and _has(allowed, "upward")

