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
    clips: int = typer.Option(12, help="number of generated multiple-choice clips"),
    captions: int = typer.Option(6, help="number of generated clips to caption (greedy vs ASD)"),
    device: str = typer.Option("cpu"),
    seed: int = typer.Option(0),
) -> None:
    """Run the paper's pipeline offline on the embedded toy model and write a report folder."""
    from .demo import run_demo

    run_demo(model=model, out=out, clips=clips, captions=captions, device=device, seed=seed)


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


@app.command("trace")
def trace_command(
    dataset: Path = typer.Argument(..., help="clip records (.json / .jsonl), see docs/dataset-format.md"),
    model: str = typer.Option("tiny", help="'tiny', 'toy-omni', 'default', or a checkpoint path / hub id"),
    out: Path = typer.Option(Path("trace.jsonl"), help="per-clip records, one JSON line each; reruns resume"),
    token_sets: str = typer.Option("all,sink,random,cross_modal_sink,unimodal_sink,random_cross_modal_sink",
                                   help="comma-separated token sets ('object' is added for annotated clips)"),
    site: str = typer.Option("input_layernorm", help="input_layernorm, resid_pre, resid_post, attn_output, "
                                                     "mlp_output"),
    window: int = typer.Option(0, help="layers per sliding window; 0 patches all layers at once"),
    method: str = typer.Option("exact", help="exact, naive or attribution"),
    ablation: str = typer.Option("raw", help="raw (black frames / silence) or encoder (zeroed encoder outputs)"),
    correctness: bool = typer.Option(False, help="a dominant clip must also answer correctly with both modalities"),
    k_divide: float = typer.Option(2.0, help="N in K = int(T / N) global sinks"),
    sink_dims: str = typer.Option("", help="comma-separated sink dimensions (default: the adapter's, or found)"),
    tau: Optional[float] = typer.Option(None, help="sink threshold (default: the adapter's)"),
    seed: int = typer.Option(0, help="seed of the random token sets"),
    batch_size: int = typer.Option(4, help="patched conditions per forward"),
    retry_errors: bool = typer.Option(False, help="recompute clips saved with an error"),
    device: str = typer.Option("cpu", help="cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)"),
) -> None:
    """Sinks + MDS, av/a/v dominance and causal tracing over a clip data set (resumable; shards under torchrun)."""
    import json
    import os

    from analyses.runner import PipelineConfig, shard_info, trace_dataset

    from .demo import load_model

    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    config = PipelineConfig(token_sets=tuple(s.strip() for s in token_sets.split(",") if s.strip()), site=site,
                            window=window or None, method=method, ablation=ablation, correctness=correctness,
                            k_divide=k_divide, tau=tau, seed=seed, batch_size=batch_size,
                            sink_dims=[int(d) for d in sink_dims.split(",") if d.strip()] or None)
    result = trace_dataset(load_model(model, device), dataset, out, config, retry_errors=retry_errors)
    rank, world = shard_info()
    if rank != 0:
        return
    summary = result.summary()
    summary_path = out.with_name(out.stem + ".summary.json")
    summary_path.write_text(json.dumps({"config": result.config, **summary}, indent=1))
    typer.echo(f"clips: {summary['clips']}  errors: {summary['errors']}  dominance: {summary['dominance']}")
    trace = result.trace
    if trace is not None:
        typer.echo(trace.table().to_string(float_format=lambda v: f"{v:.3f}"))
        trace.plot_bars().savefig(out.with_name(out.stem + ".bars.png"), dpi=120)
        if trace.effects["window"].nunique() > 1:
            trace.plot_heatmap().savefig(out.with_name(out.stem + ".heatmap.png"), dpi=120)
    typer.echo(f"records: {out}  summary: {summary_path}")


# What `nnsight-av fetch NAME` knows how to get.
_FETCHABLE = ("smol-omni",)


@app.command("fetch")
def fetch_command(
    name: str = typer.Argument(..., help=f"what to fetch: {', '.join(_FETCHABLE)}"),
    force: bool = typer.Option(False, "--force", help="fetch again even if an intact copy is cached"),
) -> None:
    """Fetch a model's weights once into the cache (NNSIGHT_AV_CACHE overrides it) and print where they are."""
    if name not in _FETCHABLE:
        raise typer.BadParameter(f"unknown name {name!r}; known: {', '.join(_FETCHABLE)}", param_hint="NAME")
    from .errors import WeightsUnavailableError
    from .smol import fetch_smol

    try:
        path = fetch_smol(force=force)
    except WeightsUnavailableError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    typer.echo(str(path))


def main() -> None:  # pragma: no cover - console entry point
    app()
