"""The command line takes the sink settings through `SinkConfig`: one option per field, defaults from it."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import nnsight_av as nav
import nnsight_av.cli as cli
from analyses.runner import PipelineResult
from analyses.sink_config import ASD_SINKS, SinkConfig
from nnsight_av.app.sink_options import option_name

WIDE = {"COLUMNS": "200", "TERMINAL_WIDTH": "200"}


def clips(folder: Path) -> Path:
    np.save(folder / "v.npy", nav.testing.synthetic_frames(2.0, 2, 56))
    np.save(folder / "a.npy", nav.testing.synthetic_tone(2.0))
    row = {"id": "c0", "video": "v.npy", "audio": "a.npy", "fps": 2, "prompt": "Which?", "options": "ABCD",
           "objects": ["dog"]}
    (folder / "clips.jsonl").write_text(json.dumps(row) + "\n")
    return folder / "clips.jsonl"


@pytest.fixture
def captured(monkeypatch):
    """Run commands without a model: `_load` returns a marker, the analyses record what they were given."""
    import importlib

    import analyses
    import analyses.runner

    evaluate_module = importlib.import_module("analyses.evaluate")     # the package attribute is the function
    seen: dict = {}

    def trace_dataset(model, data, out, config, **kwargs):
        seen["config"] = config
        return PipelineResult([], config.to_dict())

    def evaluate(model, data, methods, out, **kwargs):
        seen["method_kwargs"] = kwargs["method_kwargs"]
        return evaluate_module.EvalResult([], analyses.example_vocabulary())

    monkeypatch.setattr(cli, "_load", lambda name, device: seen.setdefault("loaded", name))
    monkeypatch.setattr(analyses.runner, "trace_dataset", trace_dataset)
    monkeypatch.setattr(evaluate_module, "evaluate", evaluate)
    return seen


def _options(command: str) -> dict:
    group = typer.main.get_command(cli.app)
    return {p.opts[0]: p for p in group.commands[command].params}


@pytest.mark.parametrize("command, base", [("trace", SinkConfig()), ("caption-eval", ASD_SINKS)])
def test_one_option_per_field_with_the_config_default(command, base):
    options = _options(command)
    for f in fields(SinkConfig):
        option = options[option_name(f.name)]
        assert option.default is None                     # not given: the config's own default applies
        shown = str(option.show_default)
        value = getattr(base, f.name)
        assert (f.metadata["unset"] if value is None else f"{value:g}" if isinstance(value, float)
                else str(value)) == shown, (f.name, shown)
    help_text = CliRunner().invoke(cli.app, [command, "--help"], env=WIDE).output
    for f in fields(SinkConfig):
        assert option_name(f.name) in help_text
    assert "[default: (3)]" in help_text if command == "caption-eval" else "[default: (2)]" in help_text
    if command == "caption-eval":
        assert "METHOD.md section 6" in help_text        # why ASD's N differs


def test_defaults_reach_the_pipeline_config(captured, tmp_path):
    result = CliRunner().invoke(cli.app, ["trace", str(clips(tmp_path)), "--model", "tiny",
                                          "--out", str(tmp_path / "t.jsonl")])
    assert result.exit_code == 0, result.output
    assert captured["config"].sinks == SinkConfig()


def test_overrides_reach_the_pipeline_config(captured, tmp_path):
    args = ["--sink-dims", "3,4", "--tau", "7.5", "--k-divide", "3", "--k", "5", "--split-rule", "sign",
            "--criterion", "magnitude"]
    result = CliRunner().invoke(cli.app, ["trace", str(clips(tmp_path)), "--model", "tiny",
                                          "--out", str(tmp_path / "t.jsonl"), *args])
    assert result.exit_code == 0, result.output
    want = SinkConfig(dims=(3, 4), tau=7.5, k_divide=3, k=5, split_rule="sign", criterion="magnitude")
    config = captured["config"]
    assert config.sinks == want
    assert (config.k_divide, config.split_rule, config.tau) == (3.0, "sign", 7.5)   # the flat shortcuts agree


def test_an_override_is_in_the_saved_settings(tmp_path):
    out = tmp_path / "t.jsonl"
    result = CliRunner().invoke(cli.app, ["trace", str(clips(tmp_path)), "--model", "tiny", "--out", str(out),
                                          "--token-sets", "all", "--sink-dims", "0,1", "--tau", "2",
                                          "--k-divide", "4", "--split-rule", "sign"])
    assert result.exit_code == 0, result.output
    settings = json.loads(Path(f"{out}.settings.json").read_text())
    assert settings["sinks"] == SinkConfig(dims=(0, 1), tau=2, k_divide=4, split_rule="sign").to_dict()
    assert PipelineResult.load(out).config["sinks"]["k_divide"] == 4.0


@pytest.mark.parametrize("args, message", [
    (["--k-divide", "0"], "--k-divide: SinkConfig.k_divide"),
    (["--k-divide", "two"], "--k-divide must be a number, got 'two'"),
    (["--tau", "x"], "--tau must be a number"),
    (["--k", "1.5"], "--k must be an int, got '1.5'"),
    (["--k", "-1"], "--k: SinkConfig.k must be an int >= 0"),
    (["--split-rule", "halves"], "--split-rule: SinkConfig.split_rule must be one of ('rank', 'sign')"),
    (["--criterion", "phy"], "--criterion: SinkConfig.criterion"),
    (["--sink-dims", "1,x"], "--sink-dims must be comma-separated ints"),
])
@pytest.mark.parametrize("command", ["trace", "caption-eval"])
def test_a_bad_value_fails_in_one_line_before_the_model_loads(captured, tmp_path, command, args, message):
    result = CliRunner().invoke(cli.app, [command, str(clips(tmp_path)), "--model", "tiny", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert "loaded" not in captured


def test_caption_eval_sinks_go_to_asd(captured, tmp_path):
    data = clips(tmp_path)
    kwargs = tmp_path / "kw.json"
    kwargs.write_text(json.dumps({"asd": {"config": {"tau": 1.5, "alpha": 0.3}}}))
    result = CliRunner().invoke(cli.app, ["caption-eval", str(data), "--model", "tiny", "--methods", "greedy,asd",
                                          "--method-kwargs", str(kwargs), "--k-divide", "4", "--split-rule", "sign",
                                          "--out", str(tmp_path / "c.jsonl")])
    assert result.exit_code == 0, result.output
    config = captured["method_kwargs"]["asd"]["config"]
    assert config["sinks"] == ASD_SINKS.with_(tau=1.5, k_divide=4, split_rule="sign").to_dict()
    assert config["alpha"] == 0.3                          # the rest of the JSON config is kept
    # no sink option: the method arguments are passed on untouched
    plain = CliRunner().invoke(cli.app, ["caption-eval", str(data), "--model", "tiny", "--methods", "greedy",
                                         "--out", str(tmp_path / "d.jsonl")])
    assert plain.exit_code == 0 and captured["method_kwargs"] is None


def test_caption_eval_sinks_without_asd_are_refused(captured, tmp_path):
    result = CliRunner().invoke(cli.app, ["caption-eval", str(clips(tmp_path)), "--model", "tiny",
                                          "--methods", "greedy", "--k-divide", "4"])
    assert result.exit_code == 2 and "--k-divide set ASD's sinks, but asd is not in --methods greedy" in result.output
    assert "loaded" not in captured


def test_trace_dataset_takes_a_whole_sink_config(tiny, monkeypatch, tmp_path):
    """``trace_dataset(..., sinks=SinkConfig(...))`` uses it (the flat shortcuts of the default config do not
    win over it); a shortcut given beside it still does."""
    import analyses.runner as runner

    seen = []
    monkeypatch.setattr(runner, "run_clips", lambda records, work, out, **kw: seen.append(kw["settings"]) or [])
    data = clips(tmp_path)
    runner.trace_dataset(tiny, data, tmp_path / "a.jsonl", sinks=SinkConfig(dims=(0, 1), k_divide=3), progress=False)
    runner.trace_dataset(tiny, data, tmp_path / "b.jsonl", sinks=SinkConfig(dims=(0, 1), k_divide=3), k_divide=4.0,
                         progress=False)
    assert [s["sinks"]["k_divide"] for s in seen] == [3.0, 4.0] and seen[0]["sinks"]["dims"] == [0, 1]
