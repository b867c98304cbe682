"""docs/tour.ipynb runs: every code cell in order in one namespace, as a kernel would (stored without outputs)."""

import json
import linecache
from pathlib import Path

import pytest

TOUR = Path(__file__).resolve().parent.parent / "docs" / "tour.ipynb"


def _cells() -> list[dict]:
    return json.loads(TOUR.read_text())["cells"]


def test_tour_is_stored_without_outputs():
    code = [c for c in _cells() if c["cell_type"] == "code"]
    assert code, "the tour has no code cells"
    for cell in code:
        assert cell.get("outputs") == [] and cell.get("execution_count") is None, "".join(cell["source"])[:60]


@pytest.mark.requires_smol
def test_tour_runs_top_to_bottom(smol_model, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import nnsight_av as nav

    real_load = nav.load
    # The session's smol-omni stands in for the notebook's own load (same call, loaded once per session).
    monkeypatch.setattr(nav, "load", lambda name, *a, **k: smol_model if name == "smol-omni" else real_load(name, *a, **k))
    namespace: dict = {"__name__": "__tour__"}
    for i, cell in enumerate(c for c in _cells() if c["cell_type"] == "code"):
        source = "".join(cell["source"])
        name = f"<{TOUR.name} code cell {i}>"
        # nnsight reads a trace's `with` body back from its source, as it does from a kernel's cells.
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        try:
            exec(compile(source, name, "exec"), namespace)
        except Exception as error:  # name the cell, keep the traceback
            raise AssertionError(f"code cell {i} of {TOUR.name} failed: {type(error).__name__}: {error}\n{source}") from error
    # what the tour tells the reader, checked against what it computed
    assert namespace["model"] is smol_model
    assert namespace["dims"] == [507]
    assert namespace["sinks"].video.numel() == 0 and namespace["sinks"].audio.numel() == 0
    assert namespace["asd"].fallback.all() and namespace["asd"].token_ids == namespace["greedy"].token_ids
    assert namespace["p_patched"].isfinite().all()
