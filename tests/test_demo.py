"""The demo writes a report whose JSON numbers match the Markdown tables, and the CLI runs it."""

import json
import re

import pytest

from nnsight_av.demo import run_demo


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run_demo(model="default", out=out, clips=3, captions=2, max_new_tokens=8, progress=False)
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
    run_demo(model="default", out=report_dir, clips=3, captions=2, max_new_tokens=8, progress=False)
    assert (report_dir / "trace.jsonl").read_text() == before


def test_cli_demo_command_writes_the_report(tmp_path):
    from typer.testing import CliRunner

    from nnsight_av.cli import app

    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "r"), "--clips", "2", "--captions", "1"])
    assert result.exit_code == 0, result.output
    assert "report written to" in result.output
    assert json.loads((tmp_path / "r" / "report.json").read_text())["clips"] == 2
