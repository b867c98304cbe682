"""Every jaxtyping shape in the library uses only the axis names of `nnsight_av.axes` (read with `ast`)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from nnsight_av.axes import AXES, axis_names

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("nnsight_av", "interventions", "analyses")


def jaxtyping_shapes(path: Path) -> list[tuple[int, str]]:
    """``(line, shape string)`` of every ``Dtype[array, "shape"]`` whose ``Dtype`` comes from jaxtyping.

    Covers ``from jaxtyping import Float`` (also aliased), ``jaxtyping.Float[...]`` and
    annotations written as strings.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    dtypes = {alias.asname or alias.name for node in ast.walk(tree)
              if isinstance(node, ast.ImportFrom) and node.module == "jaxtyping" for alias in node.names}
    modules = {alias.asname or alias.name for node in ast.walk(tree)
               if isinstance(node, ast.Import) for alias in node.names if alias.name == "jaxtyping"}

    def is_dtype(node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in dtypes
        return isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules

    found: list[tuple[int, str]] = []

    def scan(root: ast.AST, line: int | None = None) -> None:
        for node in ast.walk(root):
            if isinstance(node, ast.Subscript) and is_dtype(node.value) and isinstance(node.slice, ast.Tuple) \
                    and len(node.slice.elts) == 2:
                shape = node.slice.elts[1]
                if isinstance(shape, ast.Constant) and isinstance(shape.value, str):
                    found.append((line or node.lineno, shape.value))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "[" in node.value and \
                    any(node.value.lstrip().startswith(name + "[") for name in dtypes):
                try:  # a string annotation, e.g. "Float[torch.Tensor, 'batch seq']"
                    scan(ast.parse(node.value, mode="eval"), line or node.lineno)
                except SyntaxError:
                    pass

    scan(tree)
    return sorted(found, key=lambda item: item[0])


def unknown_axes(root: Path, packages: tuple[str, ...] = PACKAGES) -> tuple[list[str], int]:
    """Lines ``path:line: 'shape' uses name`` for names outside the glossary, and how many shapes were read."""
    problems, count = [], 0
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            for line, shape in jaxtyping_shapes(path):
                count += 1
                for name in axis_names(shape):
                    if name not in AXES:
                        problems.append(f"{path.relative_to(root)}:{line}: {shape!r} uses {name!r}")
    return problems, count


def test_every_jaxtyping_annotation_uses_the_glossary():
    problems, count = unknown_axes(ROOT)
    assert count > 50, f"only {count} jaxtyping shapes found: the scan has stopped seeing them"
    assert not problems, "axis names outside nnsight_av.axes.AXES:\n" + "\n".join(problems)


def test_checker_reports_planted_names(tmp_path):
    pkg = tmp_path / "analyses"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "from __future__ import annotations\n"
        "import jaxtyping\n"
        "import torch\n"
        "from jaxtyping import Float as F, Int\n"
        "def f(x: F[torch.Tensor, 'batch heads seq head_dim'], y: Int[torch.Tensor, 'b n 3']) -> None: ...\n"
        "Z = jaxtyping.Bool[torch.Tensor, '*batch ... layer rows=4 tokens']\n"
        "def g(x: 'Int[torch.Tensor, \"seq dim\"]') -> None: ...\n"
        "def h(x: dict[str, 'int']) -> list['torch.Tensor']: ...\n"
    )
    problems, count = unknown_axes(tmp_path, ("analyses",))
    assert count == 4
    assert [p.split(" uses ")[1] for p in problems] == ["'b'", "'n'", "'tokens'", "'dim'"]
    assert problems[0].startswith("analyses/bad.py:5: 'b n 3'")
    assert problems[-1].startswith("analyses/bad.py:7:")


def test_glossary_entries_are_one_documented_line_each():
    assert {"batch", "seq", "heads", "kv_heads", "head_dim", "hidden", "layer"} <= set(AXES)
    for name, meaning in AXES.items():
        assert name.isidentifier() and meaning and "\n" not in meaning, name


def test_docs_table_lists_the_glossary():
    text = (ROOT / "docs" / "concepts.md").read_text()
    section = text.split("## Tensor shapes: the axis glossary", 1)[1].split("\n## ", 1)[0]
    listed = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            listed |= set(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
    assert listed == set(AXES)
