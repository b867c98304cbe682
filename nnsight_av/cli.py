"""The ``nnsight-av`` command line.

Exit codes: 0 done; 1 a runtime failure (the model could not be loaded, a disk error ...);
2 a usage or configuration error, reported before the model loads where it can be (an unknown
option or model name, a bad setting, an unreadable data set, an output made under other
settings or being written by another process); 3 the run finished but some clips failed (their
error records are in the output; the summary says how many); 130 interrupted (rerun to resume).
Errors print one line (``--debug`` shows the traceback).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from analyses.sink_config import ASD_SINKS, SINK_SHORTCUTS, SinkConfig

from .app.sink_options import SinkOptions, option_name, sink_options
from .demo import DEMO_CAPTIONS, DEMO_CLIPS, DEMO_MAX_NEW_TOKENS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="nnsight-av: interpretability for audio-visual LLMs.")

#: Exit code of a run that finished with failed clips (error records in its output).
EXIT_CLIPS_FAILED = 3
_DEBUG_HELP = "show the full traceback of an error (also: NNSIGHT_AV_DEBUG=1)"


def _usage_errors() -> tuple[type[BaseException], ...]:
    from .errors import InputError, LayerIndexError, TokenSelectionError, UnknownModelError

    errors: tuple[type[BaseException], ...] = (InputError, LayerIndexError, TokenSelectionError, UnknownModelError)
    try:
        from analyses.store import OutputLockedError, SettingsMismatchError
    except ImportError:  # pragma: no cover - the analyses package is part of the distribution
        return errors
    return errors + (OutputLockedError, SettingsMismatchError)


@contextlib.contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """Turn an exception into one line on stderr and an exit code (see the module text)."""
    debug = debug or os.environ.get("NNSIGHT_AV_DEBUG", "") not in ("", "0")
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        typer.echo("interrupted; rerun the same command to resume (saved records are kept)", err=True)
        raise typer.Exit(130) from None
    except Exception as error:  # noqa: BLE001 - the CLI's boundary
        if debug:
            raise
        usage = isinstance(error, _usage_errors())
        kind = "" if usage else f"{type(error).__name__}: "
        typer.echo(f"error: {kind}{error}" + ("" if usage else "  (--debug shows the traceback)"), err=True)
        raise typer.Exit(2 if usage else 1) from None


def _model_name(model: Optional[str]) -> str:
    """The model to load: the named one (checked at once, no hub access), else the default, said on stderr."""
    from .loading import DEFAULT_MODEL, KNOWN_MODELS, check_model_name

    if model is None:
        typer.echo(f"no --model given: using {DEFAULT_MODEL!r} ({KNOWN_MODELS[DEFAULT_MODEL]})", err=True)
        return DEFAULT_MODEL
    return check_model_name(model)


def _load(model: str, device: str) -> Any:
    from .demo import load_model

    return load_model(model, device)


@app.command()
def demo(
    model: str = typer.Option("default", help="'default' (smol-omni, fetched on first use; toy-omni when it cannot "
                                              "be had), 'smol-omni', 'toy-omni', 'tiny', or a checkpoint path / hub id"),
    out: Path = typer.Option(Path("nnsight_av_report"), help="report folder"),
    clips: int = typer.Option(DEMO_CLIPS, help="number of generated multiple-choice clips (more: slower, steadier)"),
    captions: int = typer.Option(DEMO_CAPTIONS, help="number of generated clips to caption (greedy vs ASD)"),
    max_new_tokens: int = typer.Option(DEMO_MAX_NEW_TOKENS, help="tokens per caption"),
    device: str = typer.Option("cpu"),
    seed: int = typer.Option(0),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Run the paper's pipeline offline (smol-omni by default) and write a report folder."""
    from .demo import run_demo

    with _errors(debug):
        if model != "default":
            _model_name(model)
        run_demo(model=model, out=out, clips=clips, captions=captions, max_new_tokens=max_new_tokens, device=device,
                 seed=seed)


@app.command()
def spans(
    video: Optional[Path] = typer.Option(None, help="mp4 file"),
    audio: Optional[Path] = typer.Option(None, help="wav/mp3 file"),
    text: str = typer.Option("What is making the sound?"),
    model: str = typer.Option("tiny", help="any model: the layout does not depend on the weights"),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
) -> None:
    """Print the token layout (spans, chunks) a model's processor gives an input."""
    with _errors(debug):
        m = _load(_model_name(model), "cpu")
        ex = m.prepare(video=video, audio=audio, text=text)
        typer.echo(repr(ex.spans))
        for chunk in ex.spans.chunks:
            typer.echo(f"  {chunk!r}")
        typer.echo(ex.layout())


_MODEL_HELP = ("'toy-omni' (default: the shipped trained model), 'smol-omni', 'tiny' (random weights), or a "
               "checkpoint folder / hub id 'org/name'")


#: Why ASD's sink defaults differ from causal tracing's (shown in ``caption-eval --help``).
_ASD_SINKS_WHY = "ASD's default N = 3, the clean prefill of METHOD.md section 6; tracing uses N = 2"


@app.command("caption-eval")
@sink_options(ASD_SINKS, _ASD_SINKS_WHY, errors=_errors)
def caption_eval(
    dataset: Path = typer.Argument(..., help="JSON/JSONL clips: id, video, audio, prompt, objects"),
    out: Path = typer.Option(Path("captions.jsonl"), help="captions, one JSON line per (clip, method); resumed"),
    methods: str = typer.Option("greedy,vcd,fmd,asd", help="comma-separated: greedy, vcd, fmd, asd"),
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    max_new_tokens: int = typer.Option(64, min=1),
    vocabulary: Optional[Path] = typer.Option(None, help="CHAIR vocabulary JSON (default: VGGSound animals)"),
    method_kwargs: Optional[Path] = typer.Option(None, help='JSON {"asd": {"config": {...}}, "vcd": {...}}'),
    limit: Optional[int] = typer.Option(None, min=1, help="only the first N clips"),
    retry_errors: bool = typer.Option(False, help="recompute (clip, method) pairs saved with an error"),
    overwrite: bool = typer.Option(False, "--overwrite", "--new",
                                   help="start the output again (its records are deleted) instead of resuming it"),
    device: str = typer.Option("cpu"),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
    sinks: SinkOptions = None,
) -> None:
    """Caption clips with each decoding method; print CHAIR_s, CHAIR_i and ms/token per method.

    The sink options set ASD's sinks (over a config in --method-kwargs). Exit code 3 when some
    (clip, method) pairs failed (their error lines are in the output)."""
    import json

    from analyses.chair import as_vocabulary
    from analyses.evaluate import check_caption_dataset, check_eval_settings, evaluate

    from .errors import InputError

    with _errors(debug):
        name = _model_name(model)
        names = [m.strip() for m in methods.split(",") if m.strip()]
        kwargs = None
        if method_kwargs is not None:
            try:
                kwargs = json.loads(method_kwargs.read_text())
            except (OSError, ValueError) as error:
                raise InputError(f"--method-kwargs {str(method_kwargs)!r}: {error}") from None
        kwargs = _asd_sinks(kwargs, sinks, names)
        names = check_eval_settings(names, kwargs, max_new_tokens, limit)
        if vocabulary is not None:
            as_vocabulary(vocabulary, None)
        check = check_caption_dataset(dataset)
        if check.invalid:
            typer.echo(check.report(), err=True)
        loaded = _load(name, device)
        result = evaluate(loaded, check, names, out, max_new_tokens=max_new_tokens, vocabulary=vocabulary,
                          method_kwargs=kwargs, limit=limit, retry_errors=retry_errors, overwrite=overwrite)
        typer.echo(result.table().to_string(index=False, float_format=lambda v: f"{v:.4f}"))
        for note in result.notes():
            typer.echo(f"* {note}")
        typer.echo(f"captions: {out}")
        if result.errors:
            failed = sorted({r["id"] for r in result.errors})
            typer.echo(f"{len(failed)} clip(s) failed (first: {result.errors[0]['id']}: {result.errors[0]['error']})",
                       err=True)
            raise typer.Exit(EXIT_CLIPS_FAILED)


def _asd_sinks(kwargs: Optional[dict], sinks: SinkOptions, methods: list[str]) -> Optional[dict]:
    """``method_kwargs`` with the sink options given applied to ASD's config (its own sink settings under them)."""
    from dataclasses import replace

    from analyses.asd_config import ASDConfig

    from .errors import InputError

    if not sinks.given or not isinstance(kwargs, (dict, type(None))):
        return kwargs                                    # a bad --method-kwargs: check_eval_settings says why
    if "asd" not in methods:
        raise InputError(f"{', '.join(option_name(k) for k in sinks.given)} set ASD's sinks, but asd is not in "
                         f"--methods {','.join(methods)}")
    kwargs = dict(kwargs or {})
    asd = dict(kwargs.get("asd") or {})
    config = asd.get("config") or {}
    if not isinstance(config, dict):
        raise InputError(f"--method-kwargs: asd's config must be a dict of ASDConfig fields, got {config!r}")
    config = ASDConfig.from_dict(config)
    config = replace(config, sinks=config.sinks.with_(**sinks.given), **dict.fromkeys(SINK_SHORTCUTS))
    kwargs["asd"] = {**asd, "config": config.to_dict()}
    return kwargs


@app.command("trace")
@sink_options(SinkConfig(), errors=_errors)
def trace_command(
    dataset: Path = typer.Argument(..., help="clip records (.json / .jsonl), see docs/dataset-format.md"),
    model: Optional[str] = typer.Option(None, help=_MODEL_HELP),
    out: Path = typer.Option(Path("trace.jsonl"), help="per-clip records, one JSON line each; reruns resume"),
    token_sets: str = typer.Option("all,sink,random,cross_modal_sink,unimodal_sink,random_cross_modal_sink",
                                   help="comma-separated token sets ('object' is added for annotated clips)"),
    site: str = typer.Option("input_layernorm", help="input_layernorm, resid_pre, resid_post, attn_output, "
                                                     "mlp_output"),
    window: int = typer.Option(0, min=0, help="layers per sliding window; 0 patches all layers at once"),
    method: str = typer.Option("exact", help="exact, naive or attribution"),
    ablation: str = typer.Option("raw", help="raw (black frames / silence) or encoder (zeroed encoder outputs)"),
    correctness: bool = typer.Option(False, help="a dominant clip must also answer correctly with both modalities"),
    seed: int = typer.Option(0, help="seed of the random token sets"),
    batch_size: int = typer.Option(4, min=1, help="patched conditions per forward"),
    clip_batch: str = typer.Option("auto", help="clips per batch: a number, or auto (from free GPU memory; 1 on "
                                                "a CPU)"),
    retry_errors: bool = typer.Option(False, help="recompute clips saved with an error"),
    overwrite: bool = typer.Option(False, "--overwrite", "--new",
                                   help="start the output again (its records are deleted) instead of resuming it"),
    wait_timeout: Optional[float] = typer.Option(None, help="sharded runs: seconds rank 0 waits for another rank's "
                                                            "next record (default 3600)"),
    device: str = typer.Option("cpu", help="cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)"),
    debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP),
    sinks: SinkOptions = None,
) -> None:
    """Sinks + MDS, av/a/v dominance and causal tracing over a clip data set (resumable; shards under torchrun).

    Exit code 3 when some clips failed (their error records are in the output)."""
    import json

    from analyses.datasets import check_dataset
    from analyses.runner import PipelineConfig, shard_info, trace_dataset
    from analyses.store import replace_text

    with _errors(debug):
        name = _model_name(model)
        if device == "cuda" and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        config = PipelineConfig(token_sets=tuple(s.strip() for s in token_sets.split(",") if s.strip()), site=site,
                                window=window or None, method=method, ablation=ablation, correctness=correctness,
                                seed=seed, batch_size=batch_size, clip_batch=clip_batch,
                                sinks=sinks.config).validate()
        check = check_dataset(dataset)
        rank, world = shard_info()
        if check.invalid and rank == 0:
            typer.echo(check.report(), err=True)
        loaded = _load(name, device)
        result = trace_dataset(loaded, check, out, config, retry_errors=retry_errors, overwrite=overwrite,
                               wait_timeout=wait_timeout)
        if rank != 0:
            return
        summary = result.facts()
        summary_path = out.with_name(out.stem + ".summary.json")
        replace_text(summary_path, json.dumps({"config": result.config, **summary}, indent=1))
        speed = summary.get("throughput") or {}
        rate = (f"  throughput: {speed['clips_per_hour']:.0f} clips/hour ({speed['clips']} clips run now)"
                if "clips_per_hour" in speed else "")
        typer.echo(f"clips: {summary['clips']}  errors: {summary['errors']}  dominance: {summary['dominance']}{rate}")
        trace = result.trace
        if trace is not None:
            typer.echo(trace.table().to_string(float_format=lambda v: f"{v:.3f}"))
            trace.plot_bars().savefig(out.with_name(out.stem + ".bars.png"), dpi=120)
            if trace.effects["window"].nunique() > 1:
                trace.plot_heatmap().savefig(out.with_name(out.stem + ".heatmap.png"), dpi=120)
        typer.echo(f"records: {out}  summary: {summary_path}")
        if result.errors:
            first = result.errors[0]
            typer.echo(f"{len(result.errors)} of {summary['clips']} clips failed (first: {first['id']}: "
                       f"{first.get('error', '')}); rerun with --retry-errors once fixed", err=True)
            raise typer.Exit(EXIT_CLIPS_FAILED)


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


if __name__ == "__main__":  # pragma: no cover - python -m nnsight_av.cli
    sys.exit(main())
