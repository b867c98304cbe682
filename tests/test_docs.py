"""Every ```python block of the docs pages runs, page by page, like notebook cells.

nnsight reads a trace's ``with`` block from its source file, so each page's blocks are written
to a real file (in order) and run from there.
"""

import re
import runpy
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(p for p in DOCS.glob("*.md") if "```python" in p.read_text())


def blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


#: Pages whose examples load smol-omni: they need SmolLM2's GGUF (skipped, with the reason, without it).
NEEDS_SMOL = ("smol-omni.md",)


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_docs_page_runs(page, tmp_path, monkeypatch, request):
    if page.name in NEEDS_SMOL:
        request.getfixturevalue("smol_gguf")
    monkeypatch.chdir(tmp_path)
    script = tmp_path / f"docs_{page.stem.replace('-', '_')}.py"
    script.write_text("\n".join(f"# --- {page.name}, block {i}\n{code}" for i, code in enumerate(blocks(page))))
    runpy.run_path(str(script), run_name="__main__")
