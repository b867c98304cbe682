"""One result protocol: every result class of `analyses` has to_frame(), summary() (a DataFrame), save/load
that round-trip, and plot() (a Figure drawn in analyses/plots.py).

The classes are discovered: every class defined in an `analyses` module whose name ends in
"Result" or "Output", and every class registered in `analyses.results.RESULT_CLASSES`, must
subclass `Result` and have a builder in `BUILDERS` below, so a new result class without the
protocol (or without a case here) fails `test_every_result_class_is_covered`.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import pkgutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

import analyses
import nnsight_av as nav
from analyses.results import RESULT_CLASSES, Result

ROOT = Path(__file__).resolve().parent.parent
TINY_ASD = dict(sink_dims=(0, 5), tau=1.5, boost_start=1, target_start=2)


def discovered() -> dict[str, type]:
    """Result-like classes defined anywhere in `analyses` (by name), plus every registered one."""
    found = dict(RESULT_CLASSES)
    for info in pkgutil.iter_modules(analyses.__path__):
        try:
            module = importlib.import_module(f"analyses.{info.name}")
        except ImportError as error:                 # a kernel module without its optional dependency (Triton)
            if error.name in ("triton",):
                continue
            raise
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ != "analyses.results" and name.endswith(("Result", "Output")):
                found[name] = cls
    return found


# -- cheap real instances, one per class ---------------------------------------------------
def _sinks(tiny, ex, tmp):
    return analyses.sink_analysis(tiny, ex, dims=[0, 1], tau=0.0, progress=False)[0]


def _mds(tiny, ex, tmp):
    return analyses.sink_analysis(tiny, ex, dims=[0, 1], tau=0.0, progress=False)[1]


def _trace(tiny, ex, tmp):
    return analyses.causal_trace(tiny, ex, analyses.ablate(ex, "audio", tiny), "ABCD", token_sets=["all"], window=2,
                                 progress=False)


def _dominance(tiny, ex, tmp):
    return analyses.dominance(tiny, [ex], "ABCD", progress=False)


def _decode(tiny, ex, tmp):
    return analyses.greedy_generate(tiny, ex, max_new_tokens=2)


def _asd(tiny, ex, tmp):
    sets = {"av": ex.spans.audio[:2], "va": ex.spans.video[:2], "aa": ex.spans.audio[2:4], "vv": ex.spans.video[2:4]}
    return analyses.asd_generate(tiny, ex, 2, analyses.ASDConfig(boost_start=1), sinks=sets)


def _chair(tiny, ex, tmp):
    return analyses.chair(["a dog barks", "a cat"], [["dog"], ["dog"]], analyses.example_vocabulary())


def _clip_file(tmp):
    np.save(tmp / "f.npy", nav.testing.synthetic_frames(2.0, 2, 56))
    np.save(tmp / "w.npy", nav.testing.synthetic_tone(2.0))
    record = {"id": "c0", "video": "f.npy", "audio": "w.npy", "fps": 2, "prompt": "What is making the sound?",
              "options": "ABCD", "dominant": "audio", "objects": ["dog"]}
    (tmp / "clips.jsonl").write_text(json.dumps(record) + "\n")
    return tmp / "clips.jsonl"


def _pipeline(tiny, ex, tmp):
    return analyses.trace_dataset(tiny, _clip_file(tmp), tmp / "run.jsonl", sink_dims=[0, 1], tau=2.0,
                                  token_sets=("all", "sink"), progress=False)


def _eval(tiny, ex, tmp):
    from analyses.evaluate import evaluate

    return evaluate(tiny, _clip_file(tmp), ["greedy"], max_new_tokens=2, progress=False)


def _length_control(tiny, ex, tmp):
    from analyses.controls import length_control

    return length_control(tiny, lengths=[2.0], clips=1, token_sets=["sink", "random_chunk"],
                          sink_options={"dims": [0, 1], "tau": 2.0}, progress=False)


def _asd_cost(tiny, ex, tmp):
    from analyses.asd_cost import asd_cost
    from nnsight_av import toy

    return asd_cost(tiny, mc=toy.make_dataset(1, seed=0, task="mc", seconds=2.0),
                    captions=toy.make_dataset(1, seed=0, task="caption", seconds=2.0),
                    config=analyses.ASDConfig(**TINY_ASD), vocabulary=sorted(toy.OBJECT_WORDS), max_new_tokens=3,
                    progress=False)


BUILDERS = {"SinkResult": _sinks, "MDSResult": _mds, "TraceResult": _trace, "DominanceResult": _dominance,
            "DecodeOutput": _decode, "ASDOutput": _asd, "ChairResult": _chair, "PipelineResult": _pipeline,
            "EvalResult": _eval, "LengthControlResult": _length_control, "ASDCostResult": _asd_cost}
#: Each class's own save suffix (JSONL for the per-clip run files).
SUFFIX = {"DominanceResult": ".jsonl", "PipelineResult": ".jsonl", "EvalResult": ".jsonl"}


def test_every_result_class_is_covered():
    found = discovered()
    assert {"EvalResult", "LengthControlResult", "ASDCostResult", "PipelineResult"} <= set(found)
    missing = sorted(set(found) - set(BUILDERS))
    assert not missing, f"result classes without a protocol case here: {missing}"
    for name, cls in found.items():
        assert issubclass(cls, Result), f"{name} does not subclass analyses.results.Result"


@pytest.fixture(scope="module")
def built(tiny, av_example, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = BUILDERS[name](tiny, av_example, tmp_path_factory.mktemp(name))
        return cache[name]

    return get


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_result_protocol(built, name, tmp_path):
    result = built(name)
    cls = discovered()[name]
    assert type(result) is cls
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    summary = result.summary()
    assert isinstance(summary, pd.DataFrame) and len(summary) > 0
    path = result.save(tmp_path / f"{name}{SUFFIX.get(name, '.json')}")
    again = cls.load(path)
    assert type(again) is cls
    pd.testing.assert_frame_equal(again.to_frame(), frame, check_exact=True)
    pd.testing.assert_frame_equal(again.summary(), summary, check_exact=True)
    fig = result.plot()
    assert isinstance(fig, Figure) and fig.axes


def test_drawing_code_lives_in_plots():
    """No result class draws: the modules defining them never import pyplot or call subplots/bar/imshow."""
    for name, cls in discovered().items():
        source = Path(inspect.getsourcefile(cls)).read_text()
        tree = ast.parse(source)
        imports = [a.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for a in node.names] + [node.module or "" for node in ast.walk(tree)
                                           if isinstance(node, ast.ImportFrom)]
        assert not any("pyplot" in i for i in imports), f"{name}'s module imports pyplot"
        calls = {node.func.attr for node in ast.walk(tree)
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        drawing = calls & {"subplots", "add_subplot", "errorbar", "imshow", "bar", "axhline", "set_xlabel"}
        assert not drawing, f"{name}'s module draws ({sorted(drawing)}); move it to analyses/plots.py"


def test_old_names_stay(built, tmp_path):
    trace = built("TraceResult")
    assert trace.frame.index.names == ["clip", "token_set", "window"]
    assert analyses.TraceResult.from_json(trace.to_json()).to_frame().equals(trace.to_frame())
    assert built("DominanceResult").frame.index.name == "id"
    cost = built("ASDCostResult")
    assert analyses.ASDCostResult.from_json(cost.to_json(tmp_path / "c.json")).to_frame().equals(cost.to_frame())
    assert "ASD cost:" in cost.report()
    lengths = built("LengthControlResult")
    assert "length control:" in lengths.report()
    assert built("PipelineResult").facts()["clips"] == 1


def test_trace_plots(built):
    from analyses import plots

    trace = built("TraceResult")
    assert isinstance(plots.plot_trace_heatmap(trace), Figure) and isinstance(trace.plot("heatmap"), Figure)
    with pytest.raises(nav.InputError, match="kind must be"):
        trace.plot("pie")


def test_a_json_of_another_kind_is_refused(built, tmp_path):
    path = built("ChairResult").save(tmp_path / "chair.json")
    with pytest.raises(nav.InputError, match="holds a ChairResult, not a MDSResult"):
        analyses.MDSResult.load(path)


def test_pipeline_save_keeps_the_settings(built, tmp_path):
    run = built("PipelineResult")
    again = analyses.PipelineResult.load(run.save(tmp_path / "p.jsonl"))
    assert again.config == json.loads(json.dumps(run.config))
    assert again.config["sinks"]["tau"] == 2.0 and again.config["token_sets"] == ["all", "sink"]
