"""The ``nnsight-av`` command line."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="nnsight-av: interpretability for audio-visual LLMs.")


@app.command()
def demo(
    model: str = typer.Option("default", help="'default' (the embedded model), 'tiny', 'toy-omni', or a "
                                              "checkpoint path / hub id"),
    out: Path = typer.Option(Path("nnsight_av_report"), help="report folder"),
    clips: int = typer.Option(8, help="number of generated clips"),
    device: str = typer.Option("cpu"),
    seed: int = typer.Option(0),
) -> None:
    """Run the pipeline offline on the embedded model and write a report folder."""
    from .demo import run_demo

    run_demo(model=model, out=out, clips=clips, device=device, seed=seed)


@app.command()
def spans(
    video: Optional[Path] = typer.Option(None, help="mp4 file"),
    audio: Optional[Path] = typer.Option(None, help="wav/mp3 file"),
    text: str = typer.Option("What is making the sound?"),
    model: str = typer.Option("tiny"),
) -> None:
    """Print the token layout (spans, chunks) a model's processor gives an input."""
    from .demo import load_model

    m = load_model(model, "cpu")
    ex = m.prepare(video=video, audio=audio, text=text)
    typer.echo(repr(ex.spans))
    for chunk in ex.spans.chunks:
        typer.echo(f"  {chunk!r}")
    typer.echo(ex.layout())


@app.command("caption-eval")
def caption_eval(
    dataset: Path = typer.Argument(..., help="JSON/JSONL clips: id, video, audio, prompt, objects"),
    out: Path = typer.Option(Path("captions.jsonl"), help="captions, one JSON line per (clip, method); resumed"),
    methods: str = typer.Option("greedy,vcd,fmd,asd", help="comma-separated: greedy, vcd, fmd, asd"),
    model: str = typer.Option("tiny", help="'tiny', 'toy-omni', 'default', or a checkpoint path / hub id"),
    max_new_tokens: int = typer.Option(64),
    vocabulary: Optional[Path] = typer.Option(None, help="CHAIR vocabulary JSON (default: VGGSound animals)"),
    method_kwargs: Optional[Path] = typer.Option(None, help='JSON {"asd": {"config": {...}}, "vcd": {...}}'),
    limit: Optional[int] = typer.Option(None, help="only the first N clips"),
    device: str = typer.Option("cpu"),
) -> None:
    """Caption clips with each decoding method; print CHAIR_s, CHAIR_i and ms/token per method."""
    import json

    from analyses.evaluate import evaluate

    from .demo import load_model

    kwargs = json.loads(method_kwargs.read_text()) if method_kwargs is not None else None
    result = evaluate(load_model(model, device), dataset, [m.strip() for m in methods.split(",") if m.strip()], out,
                      max_new_tokens=max_new_tokens, vocabulary=vocabulary, method_kwargs=kwargs, limit=limit)
    typer.echo(result.table().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    typer.echo(f"captions: {out}")


def main() -> None:  # pragma: no cover - console entry point
    app()
