"""One result protocol: every result class has to_frame(), summary() (a DataFrame), save/load and plot()."""

from __future__ import annotations

import pandas as pd
import pytest
from matplotlib.figure import Figure

import nnsight_av as nav
from analyses import ablate, causal_trace, chair, dominance, example_vocabulary, sink_analysis
from analyses.asd import ASDConfig, asd_generate
from analyses.decoding import greedy_generate


@pytest.fixture(scope="module")
def results(tiny, av_example):
    sinks, mds = sink_analysis(tiny, av_example, dims=[0, 1], tau=0.0, progress=False)
    trace = causal_trace(tiny, av_example, ablate(av_example, "audio", tiny), "ABCD", token_sets=["all"], window=2,
                         progress=False)
    sets = {"av": av_example.spans.audio[:2], "va": av_example.spans.video[:2],
            "aa": av_example.spans.audio[2:4], "vv": av_example.spans.video[2:4]}
    return {
        "sinks": sinks, "mds": mds, "trace": trace,
        "dominance": dominance(tiny, [av_example], "ABCD", progress=False),
        "greedy": greedy_generate(tiny, av_example, max_new_tokens=2),
        "asd": asd_generate(tiny, av_example, 2, ASDConfig(boost_start=1), sinks=sets),
        "chair": chair(["a dog barks", "a cat"], [["dog"], ["dog"]], example_vocabulary()),
    }


@pytest.mark.parametrize("name", ["sinks", "mds", "trace", "dominance", "greedy", "asd", "chair"])
def test_every_result_follows_the_protocol(results, name, tmp_path):
    result = results[name]
    frame = result.to_frame()
    assert isinstance(frame, pd.DataFrame) and len(frame) > 0
    assert isinstance(result.summary(), pd.DataFrame) and len(result.summary()) > 0
    path = result.save(tmp_path / f"{name}.json")
    again = type(result).load(path)
    pd.testing.assert_frame_equal(again.to_frame().reset_index(drop=True), frame.reset_index(drop=True),
                                  check_dtype=False)
    if name in ("greedy", "chair"):
        with pytest.raises(nav.InputError, match="has no plot"):
            result.plot()
    else:
        assert isinstance(result.plot(), Figure)


def test_trace_plots_live_in_plots(results):
    from analyses import plots

    trace = results["trace"]
    assert isinstance(plots.plot_trace_heatmap(trace), Figure) and isinstance(trace.plot("heatmap"), Figure)
    assert trace.frame.index.names == ["clip", "token_set", "window"]            # the old view stays
    with pytest.raises(nav.InputError, match="kind must be"):
        trace.plot("pie")
