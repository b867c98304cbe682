"""The import rules of the project, read from the source with `ast` (no module is imported).

Layers, lowest first; a module may import its own layer and those below it, never above:

0. ``base``: ``nnsight_av.errors``, ``nnsight_av.spans``, ``nnsight_av.axes`` (what adapters describe models
   with, and the axis names of tensor shapes)
1. ``adapters``: ``nnsight_av.adapters.*`` (one model family each, and its architecture code)
2. ``core``: the rest of ``nnsight_av`` (model, inputs, media, loading, testing, toy, ...)
3. ``interventions``: ``interventions.*``
4. ``analyses``: ``analyses.*``
5. ``application``: ``nnsight_av.cli``, ``nnsight_av.demo``, ``nnsight_av.app.*``

Further rules (`check` lists every violation as one line):

- ``interventions`` and ``analyses`` reach the model only through `AVModel`: no import of
  ``nnsight_av.adapters``, no ``get_module``, no ``._module``, no ``.adapter.paths`` /
  ``.adapter.layer_paths`` (``model.raw(...)`` is the accessor for raw modules);
- the generic core (``GENERIC_CORE``) names no particular adapter module;
- no private name (``_x``) is imported from another project module;
- ``interventions`` and ``analyses`` import project modules at module level only (a
  function-local import is how circles were hidden), and their module graph has no circle.
  Exception: a module that needs an optional dependency (``OPTIONAL``, e.g. Triton kernels)
  at module level is imported where it is used, so the rest works without it.

Imports under ``if TYPE_CHECKING:`` count for the layer rules, not for circles.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("nnsight_av", "interventions", "analyses")
BASE = {"nnsight_av.errors", "nnsight_av.spans", "nnsight_av.axes"}
APPLICATION = ("nnsight_av.cli", "nnsight_av.demo", "nnsight_av.app")
LAYER_NAMES = ("base", "adapters", "core", "interventions", "analyses", "application")
#: Core modules that work for every adapter: they may use ``nnsight_av.adapters.base`` only.
GENERIC_CORE = {"nnsight_av.model", "nnsight_av.inputs", "nnsight_av.media", "nnsight_av.loading",
                "nnsight_av.validation", "nnsight_av.spans", "nnsight_av.errors"}
#: Packages whose project imports must sit at module level and form no circle.
STRICT = ("interventions", "analyses")
#: Optional third-party dependencies: a project module importing one at module level may be imported lazily.
OPTIONAL = ("triton",)
#: Attribute names that reach past `AVModel` into raw modules or adapter paths.
RAW_ATTRIBUTES = {"_module", "get_module"}
ADAPTER_PATH_ATTRIBUTES = {"paths", "layer_paths"}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    """The layer index of a project module (None: not a project module)."""
    if module in BASE:
        return 0
    if _within(module, "nnsight_av.adapters"):
        return 1
    if any(_within(module, app) for app in APPLICATION):
        return 5
    if _within(module, "nnsight_av"):
        return 2
    if _within(module, "interventions"):
        return 3
    if _within(module, "analyses"):
        return 4
    return None


@dataclass(frozen=True)
class Import:
    source: str          # importing module
    target: str          # imported module (absolute)
    names: tuple[str, ...]
    line: int
    local: bool          # inside a function
    type_only: bool      # under `if TYPE_CHECKING:`


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path) -> tuple[list[Import], ast.AST]:
    """Every import in ``path`` with where it sits (function-local, TYPE_CHECKING-only)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_local = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_stmt(stmt, child_local, True)
                for stmt in child.orelse:
                    visit_stmt(stmt, child_local, type_only)
                continue
            visit_stmt(child, child_local, type_only)

    def visit_stmt(node: ast.AST, local: bool, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, (), node.lineno, local, type_only))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            names = tuple(a.name for a in node.names)
            found.append(Import(module, target, names, node.lineno, local, type_only))
            # `from pkg import sub` imports the submodule pkg.sub when it is one
            for name in names:
                if layer_of(f"{target}.{name}") is not None:
                    found.append(Import(module, f"{target}.{name}", (), node.lineno, local, type_only))
        visit(node, local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)), type_only)

    visit(tree, False, False)
    return found, tree


def project_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(root, path)] = path
    return out


def _existing(target: str, modules: dict[str, Path]) -> str | None:
    """The project module ``target`` names (``pkg.name`` may be an object in ``pkg``)."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def check(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every violation of the module docstring's rules under ``root``, one line each."""
    modules = project_modules(root, packages)
    problems: list[str] = []
    graph: dict[str, set[str]] = {}
    parsed = {module: imports_of(module, path) for module, path in modules.items()}
    optional = {module for module, (found, _) in parsed.items()
                if any(not imp.local and any(_within(imp.target, dep) for dep in OPTIONAL) for imp in found)}
    for module, path in modules.items():
        where = f"{path.relative_to(root)}"
        mine = layer_of(module)
        strict = any(_within(module, p) for p in STRICT)
        found, tree = parsed[module]
        for imp in found:
            target = _existing(imp.target, modules) or imp.target
            theirs = layer_of(target)
            if theirs is None:
                continue
            at = f"{where}:{imp.line}"
            if mine is not None and theirs > mine:
                problems.append(f"{at}: {LAYER_NAMES[mine]} module {module} imports {LAYER_NAMES[theirs]} module "
                                f"{target}")
            if strict and theirs == 1:
                problems.append(f"{at}: {module} imports adapter internals ({target}); use AVModel")
            if module in GENERIC_CORE and theirs == 1 and target not in ("nnsight_av.adapters",
                                                                         "nnsight_av.adapters.base"):
                problems.append(f"{at}: generic core module {module} imports one adapter ({target})")
            private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
            if private and target != module:
                problems.append(f"{at}: {module} imports private name(s) {private} from {target}")
            if strict and imp.local and not imp.type_only and target != module and target not in optional:
                problems.append(f"{at}: {module} imports project module {target} inside a function")
            if not imp.type_only and target != module and (_within(target, module.split(".")[0])):
                graph.setdefault(module, set()).add(target)
        if strict:
            for node in ast.walk(tree):
                attr = node.attr if isinstance(node, ast.Attribute) else (node.id if isinstance(node, ast.Name)
                                                                          else None)
                if attr in RAW_ATTRIBUTES:
                    problems.append(f"{where}:{node.lineno}: {module} uses {attr!r}; reach raw modules "
                                    f"through model.raw(...)")
                if (isinstance(node, ast.Attribute) and node.attr in ADAPTER_PATH_ATTRIBUTES
                        and isinstance(node.value, ast.Attribute) and node.value.attr == "adapter"):
                    problems.append(f"{where}:{node.lineno}: {module} reads adapter.{node.attr}; reach raw "
                                    f"modules through model.raw(...)")
    for package in STRICT:
        sub = {m: {t for t in ts if _within(t, package) and not modules[t].name == "__init__.py"}
               for m, ts in graph.items() if _within(m, package) and modules[m].name != "__init__.py"}
        for component in _cycles(sub):
            problems.append(f"import circle in {package}: {' -> '.join(component)}")
    return list(dict.fromkeys(problems))
