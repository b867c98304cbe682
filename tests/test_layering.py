"""One-way layering, checked on the source: adapters -> core -> interventions -> analyses -> application.

The rules are in `tests/layering.py`; the checker is tested on a planted tree too, so a rule
that silently stopped firing would fail here.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import layering  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_repository_follows_the_layering():
    problems = layering.check(ROOT)
    assert problems == [], "\n".join(problems)


def _plant(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for package in layering.PACKAGES:
        for folder in [root / package, *(p for p in (root / package).rglob("*") if p.is_dir())]:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "__init__.py").touch()


def test_checker_reports_each_planted_violation(tmp_path):
    _plant(tmp_path, {
        "nnsight_av/model.py": """
            def run():
                from interventions import run  # upward, function-local
            from .adapters.qwen import TEMPLATE  # one adapter in the generic core
        """,
        "nnsight_av/adapters/qwen.py": "from ..testing.tiny import Model\nTEMPLATE = ''\n",
        "nnsight_av/testing/tiny.py": "Model = object\n",
        "nnsight_av/cli.py": "import analyses.a\n",                  # application may import anything
        "interventions/x.py": "from analyses.a import f\n",
        "analyses/a.py": """
            from typing import TYPE_CHECKING
            from nnsight_av.adapters.base import get_module
            from .b import g, _private
            if TYPE_CHECKING:
                from nnsight_av.cli import app  # still upward
            def f(model):
                return get_module(model._module, "lm_head")
        """,
        "analyses/b.py": """
            def g():
                from .a import f
                return f
            _private = 1
        """,
        "analyses/c.py": "def h(model):\n    return model.adapter.paths['layers']\n",
        "nnsight_av/adapters/base.py": "",
    })
    problems = "\n".join(layering.check(tmp_path))
    expected = [
        "core module nnsight_av.model imports interventions module interventions",
        "generic core module nnsight_av.model imports one adapter (nnsight_av.adapters.qwen)",
        "adapters module nnsight_av.adapters.qwen imports core module nnsight_av.testing.tiny",
        "interventions module interventions.x imports analyses module analyses.a",
        "analyses.a imports adapter internals (nnsight_av.adapters.base)",
        "analyses.a imports private name(s) ['_private'] from analyses.b",
        "analyses module analyses.a imports application module nnsight_av.cli",
        "analyses.a uses '_module'",
        "analyses.a uses 'get_module'",
        "analyses.b imports project module analyses.a inside a function",
        "analyses.c reads adapter.paths",
        "import circle in analyses: analyses.a -> analyses.b",
    ]
    for line in expected:
        assert line in problems, f"missing: {line}\n--- got:\n{problems}"
    assert "nnsight_av/cli.py" not in problems


def test_lazy_import_of_an_optional_kernel_module_is_allowed(tmp_path):
    _plant(tmp_path, {
        "analyses/_kernel.py": "import triton\n",
        "analyses/fast.py": "def f():\n    from ._kernel import k\n",
        "analyses/slow.py": "def f():\n    from .fast import f\n",
    })
    problems = layering.check(tmp_path)
    assert problems == ["analyses/slow.py:2: analyses.slow imports project module analyses.fast inside a function"]


def test_model_run_needs_the_registered_runner(tiny, av_example, monkeypatch):
    import interventions  # noqa: F401  (registers the runner)
    import nnsight_av.model as core
    from nnsight_av.errors import InputError

    assert tuple(tiny.run(av_example).shape[:2]) == (1, len(av_example))
    monkeypatch.setattr(core, "_RUNNER", None)
    with pytest.raises(InputError, match="import interventions"):
        tiny.run(av_example)


def test_raw_modules_come_from_one_accessor(tiny):
    from nnsight_av.errors import AdapterError

    assert tiny.raw("layer", 1) is tiny.raw("layers")[1]
    assert tiny.raw("self_attn", layer=-1) is tiny.raw("layers")[tiny.num_layers - 1].self_attn
    assert tiny.raw("lm_head") is tiny.raw().lm_head
    with pytest.raises(AdapterError, match="needs layer="):
        tiny.raw("mlp")
    with pytest.raises(AdapterError, match="unknown module role 'ffn'"):
        tiny.raw("ffn")
