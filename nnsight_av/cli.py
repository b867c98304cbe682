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


def main() -> None:  # pragma: no cover - console entry point
    app()
