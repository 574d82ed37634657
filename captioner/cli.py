"""The `captioner` command line. Thin: parse options, call one library function, render with rich.

Heavy imports (torch, torchvision) happen inside the commands, so `captioner --help` starts fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from captioner import __version__
from captioner.config import (
    PRECISION_HELP,
    DecodeSettings,
    Device,
    Format,
    ModelConfig,
    Precision,
    SCSTConfig,
    Split,
    TrainConfig,
    Which,
    declared,
)
from captioner.errors import CaptionerError, ConfigError, printable
from captioner.serve.settings import ServeSettings

app = typer.Typer(
    name="captioner",
    help="Image captioning from the shell: train a CNN or ViT captioner, caption images, see where it looked.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Look at and prepare datasets: write the built-in world to disk, check a dataset.",
                       no_args_is_help=True)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])
ImageDir = Annotated[str | None, typer.Option("--images", help="Image folder for the dataset's relative paths.")]
Patterns = Annotated[list[str], typer.Argument(metavar="IMAGES", help="Image files, directories or glob patterns.")]


def _plain(value: object) -> str:
    """Text from outside (a file name, a caption, a note) made safe to embed in rich markup and to show.

    Without this a path like `shots[/b]x.jpg` is read as a closing tag: rich raises, and the one-line
    error becomes a traceback; `[red]x.jpg` would silently lose part of its name. Rich passes ESC through,
    so a name or vocabulary word holding a terminal escape is shown as `\\x1b` rather than obeyed.
    """
    from rich.markup import escape

    return escape(printable(str(value)))


def _err(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[bold red]error:[/] {_plain(message)}",
                                                                 markup=True)


def user_errors(fn: F) -> F:
    """Turn every failure into one line on stderr and a non-zero exit (a traceback only with --debug).

    The wrapper takes the command's Click context (added to its signature, so Typer passes it) to read
    `--debug`, which the root callback keeps in the context's `obj`: no state outside the invocation.
    """

    @functools.wraps(fn)
    def wrapper(ctx: typer.Context, *args: Any, **kwargs: Any) -> Any:
        debug = bool((ctx.find_root().obj or {}).get("debug"))
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except CaptionerError as err:
            if debug:
                raise
            _err(str(err))
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except Exception as err:  # an internal bug: still one line, the traceback on request
            if debug:
                raise
            _err(f"internal error: {type(err).__name__}: {err} (run with --debug for the traceback)")
            raise typer.Exit(1) from None

    signature = inspect.signature(fn, eval_str=True)  # the options' Annotated[...] as objects, not strings
    context = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    wrapper.__signature__ = signature.replace(parameters=[context, *signature.parameters.values()])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {"ctx": typer.Context, **{n: p.annotation for n, p in signature.parameters.items()}}
    return wrapper  # type: ignore[return-value]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"captioner {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="CAPTIONER_DEBUG",
                                        help="Show full tracebacks instead of one-line errors.")] = False,
) -> None:
    """captioner: train, caption, attend, evaluate."""
    ctx.obj = {"debug": debug}


# ----------------------------------------------------------------------------- train


def _parse_set(items: list[str]) -> dict[str, Any]:
    """--set d_model=256 --set norm_first=false -> typed model overrides."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects field=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def _declared_option(config: type, name: str) -> Any:
    """The command-line option of a config field, from its declaration in config.py (`option`): None = not given."""
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    spec = field.metadata["option"]
    kind = spec.choices or _KINDS[str(field.type).split(" |")[0]]
    flags = [spec.flag] if spec.flag else []
    return Annotated[kind | None, typer.Option(*flags, min=spec.low, max=spec.high, help=spec.help)]


def _with_options(config: type, into: str, only: tuple[str, ...] | None = None,
                  show_defaults: bool = False) -> Callable[[F], F]:
    """Give a command a flag for every field of `config` declared with one (or the `only` ones), in place of its
    parameter `into`, which receives their values as one dict (None: not given): each flag's help, bounds and
    choices are declared once, in config.py."""
    names = [name for name, spec in declared(config).items() if spec.cli and (only is None or name in only)]

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(**kwargs: Any) -> Any:
            return fn(**{into: {name: kwargs.pop(name) for name in names}}, **kwargs)

        signature = inspect.signature(fn, eval_str=True)
        # show_defaults: the field's default as the flag's (--help shows it); else None, "not given", for
        # training, whose defaults depend on the data and a resumed run.
        defaults = {f.name: f.default for f in dataclasses.fields(config)} if show_defaults else {}
        flags = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(name),
                                   annotation=_declared_option(config, name)) for name in names]
        parameters = [q for p in signature.parameters.values() for q in (flags if p.name == into else [p])]
        wrapper.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


ScstSamples = _declared_option(SCSTConfig, "samples")
ScstBaseline = _declared_option(SCSTConfig, "baseline")


@app.command()
@user_errors
@_with_options(TrainConfig, "options")
@_with_options(ModelConfig, "model_options")
def train(
    *,
    options: dict[str, Any],  # a flag for each TrainConfig field that declares one (config.py), gathered here
    out: Annotated[Path | None, typer.Option(help="Run directory (default: runs/<encoder>-<time>).")] = None,
    resume: Annotated[Path | None, typer.Option(help="Continue the run in this directory.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML or JSON file of options; the command line wins.")] = None,
    model_options: dict[str, Any],  # the same for ModelConfig's: --image-size, --patch-size ...
    set_: Annotated[list[str] | None, typer.Option("--set", help="Model field override, e.g. d_model=256.")] = None,
    skip_bad_images: Annotated[bool, typer.Option(help="Skip unreadable images instead of stopping.")] = False,
    scst: Annotated[bool, typer.Option(help="Self-critical fine-tuning (CIDEr-D reward) of --resume RUN.")] = False,
    scst_samples: ScstSamples = None,
    scst_baseline: ScstBaseline = None,
) -> None:
    """Train a captioning model (on the built-in synthetic world unless --data is given)."""
    from captioner import checkpoint
    from captioner.config import resolve

    # --set may name a field that has its own option too (--set cnn_arch=resnet18): it wins, as the later word.
    model_cli = {**model_options, **_parse_set(set_ or [])}
    if not scst and (scst_samples is not None or scst_baseline is not None):
        raise ConfigError("--scst-samples and --scst-baseline only apply with --scst")
    if scst and resume is None:
        raise ConfigError("--scst fine-tunes a trained run: give it with --resume RUN_DIR")
    saved = checkpoint.read_run_config(resume) if resume is not None else None
    scst_options = dict(samples=scst_samples, baseline=scst_baseline.value if scst_baseline else None) if scst else None
    resolved = resolve(cli=options, model_cli=model_cli, config_file=config, saved=saved, scst=scst_options)
    for note in resolved.notes:  # what resolving chose for the user (--pretrained's encoder), said before any work
        typer.echo(printable(note), err=True)
    _print_result(_run_training(resolved, resume=resume, out=out, skip_bad_images=skip_bad_images))


def _run_training(resolved: Any, *, resume: Path | None, out: Path | None, skip_bad_images: bool) -> Any:
    """Train (or SCST fine-tune) with a progress view on the terminal; the run's result."""
    from captioner import checkpoint, training

    view = _TrainView()
    try:
        if resolved.scst is not None:
            from captioner.scst import train_scst

            return train_scst(resume, resolved.train, resolved.scst, out=out, on_event=view.on_event)
        run_dir = resume or out or _new_run_dir(resolved.train.encoder)
        try:
            return training.train(resolved.train, run_dir, resume=resume is not None, on_event=view.on_event,
                                  skip_bad_images=skip_bad_images)
        except BaseException:
            if resume is None and out is None:
                checkpoint.discard_if_unused(run_dir)  # a default folder the failed start made: no litter in runs/
            raise
    finally:
        view.close()


def _new_run_dir(encoder: str) -> Path:
    """A new folder runs/<encoder>-<time> of this run alone; under torchrun every rank must be told one with --out."""
    import os

    from captioner import checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("under torchrun give the run directory with --out, so every process writes to the same one")
    return checkpoint.new_run_dir(checkpoint.DEFAULT_ROOT, encoder)


class _BarView:
    """Lines on stderr through rich, around an optional tqdm bar that they never tear."""

    def __init__(self, **console: Any) -> None:
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True, **console)  # a line naming a file stays one line
        self.bar = None

    def _clear(self) -> None:
        if self.bar is not None:
            self.bar.clear()

    def _write(self, text: str) -> None:
        self._clear()
        self.console.print(text)
        if self.bar is not None:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _TrainView(_BarView):
    """Renders training events: a tqdm bar with loss, lr and images/s; rich lines for validations."""

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        from tqdm import tqdm

        if kind == "start":
            m = data["model"]
            self.console.print(
                f"[bold]training[/] {m['encoder']} captioner, {data['parameters'] / 1e6:.2f}M parameters, "
                f"{data['train_images']} train / {data['val_images']} val images, device {data['device']} "
                f"({data['precision']}), {data['steps']} steps -> {_plain(data['run_dir'])}")
            self.bar = tqdm(total=data["steps"], initial=data["start_step"], unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=None)
        elif kind == "step" and self.bar is not None:
            self.bar.n = data["step"]
            self.bar.set_postfix(loss=f"{data['loss']:.3f}", lr=f"{data['lr']:.2e}",
                                 img_s=f"{data['images_per_s']:.0f}", refresh=False)
            self.bar.refresh()
        elif kind == "validate":
            parts = [f"{k} {data[k]:.3f}" for k in ("BLEU-4", "CIDEr-D", "accuracy") if k in data]
            if "claims_relation" in data:
                parts += [f"relations true {data['claims_relation']:.0%}"]
            parts += [f"distinct {data.get('distinct_share', 0):.0%}"]
            self._write(f"step {data['step']}: " + ", ".join(parts))
        elif kind == "plan":
            if self.bar is not None:
                self.bar.total = data["steps"]
            if data["first"]:
                self._write(f"fitting the schedule to the {data['minutes']:g}-min time limit: {data['steps']} of "
                            f"{data['configured']} steps at this machine's pace (refitted after each validation)")
        elif kind == "warning":
            self._write(f"[bold yellow]warning:[/] {_plain(data['message'])}")
        elif kind == "note":
            self._write(_plain(data["message"]))
        elif kind == "progress":  # preparation before the first step (the feature cache)
            if self.bar is None:
                self.bar = tqdm(total=data["total"], unit="image", desc=data["what"], dynamic_ncols=True,
                                file=sys.stderr, disable=None)
            self.bar.n = data["done"]
            self.bar.refresh()
            if data["done"] >= data["total"]:
                self.close()  # the step bar follows


def _print_result(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"run {_plain(result.run_dir)}", show_header=True)
    table.add_column("metric")
    table.add_column("best", justify="right")
    table.add_column("last", justify="right")
    keys = [k for k in ("BLEU-4", "CIDEr-D", "accuracy", "distinct_share", "step") if k in result.best]
    for key in keys:
        best, last = result.best.get(key, ""), result.last.get(key, "")
        table.add_row(key, f"{best:.4g}" if isinstance(best, float) else str(best),
                      f"{last:.4g}" if isinstance(last, float) else str(last))
    console.print(table)
    console.print(f"{result.steps} steps in {result.seconds:.0f} s ({result.stopped}). "
                  "Caption with: captioner caption IMAGE "
                  f"--model {_plain(result.run_dir)}")


# ----------------------------------------------------------------------------- caption


Model = Annotated[Path | None, typer.Option("--model", help="Run directory (default: newest under ./runs).")]
Checkpoint = Annotated[Which, typer.Option(
    "--checkpoint", help="best (kept by validation) or last (the latest weights) of the run.")]
InferPrecision = Annotated[Precision, typer.Option("--precision", help=PRECISION_HELP)]


def _given(flags: dict[str, Any]) -> dict[str, Any]:
    """The declared flags the user gave (a flag not given is None and keeps its field's default)."""
    return {name: value for name, value in flags.items() if value is not None}


def _settings(decoding: dict[str, Any]) -> DecodeSettings:
    """The search the decoding flags ask for."""
    return DecodeSettings(**_given(decoding))


@app.command()
@user_errors
@_with_options(DecodeSettings, "decoding", show_defaults=True)
def caption(
    patterns: Patterns,
    *,
    model: Model = None,
    checkpoint_: Checkpoint = Which.best,
    decoding: dict[str, Any],  # a flag for each DecodeSettings field (config.py): --beam, --max-len, --sample ...
    batch_size: Annotated[int, typer.Option(min=1, max=1024)] = 32,
    workers: Annotated[int | None, typer.Option(min=0, max=64, help="Processes decoding the image files "
                                                "(default: one per spare core, none for a single batch).")] = None,
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Search directories recursively.")] = False,
    out: Annotated[Path | None, typer.Option(help="Results file (.jsonl, .csv or .json), written as each "
                                             "batch finishes.")] = None,
    skip_done: Annotated[bool, typer.Option(help="Caption only the images not yet in --out; keep the rest.")
                         ] = False,
    resume_from: Annotated[Path | None, typer.Option(help="Skip the images already in this results file and "
                                                     "carry its results into --out (default: into it).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out file.")] = False,
    device: Annotated[Device, typer.Option()] = Device.auto,
    precision: InferPrecision = Precision.auto,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")] = False,
) -> None:
    """Caption images with a trained run (greedy, beam search or sampling); torchrun shards the files."""
    from captioner.bulk import caption_many

    settings = _settings(decoding)
    if skip_done and out is None:
        raise ConfigError("--skip-done needs --out (the results file to continue)")
    view = _CaptionView(json_out=json_out, table=not json_out and out is None and resume_from is None)
    try:
        result = caption_many(patterns, settings, model=model, which=checkpoint_.value, device=device.value,
                              precision=precision.value, out=out, resume_from=resume_from, skip_done=skip_done,
                              overwrite=overwrite, recursive=recursive, batch_size=batch_size, workers=workers,
                              on_event=view.on_event)
    finally:
        view.close()
    view.summary(result)
    if result.failures:
        raise typer.Exit(1)


class _CaptionView(_BarView):
    """Renders `caption_many` events: errors as met, JSON lines or a table, a progress bar for long runs."""

    def __init__(self, *, json_out: bool, table: bool) -> None:
        super().__init__(highlight=False)
        self.json_out = json_out
        self.rows: list[tuple[str, str, float]] | None = [] if table else None

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "problem":
            self._write(f"[bold red]error:[/] {_plain(data['error'])}")
        elif kind == "start":
            if data["skipped"]:
                self._write(f"{data['skipped']} of {data['total']} images already captioned; "
                            f"captioning the other {data['todo']}")
            self._start_bar(data["todo"])
        elif kind == "batch":
            for failure in data["failures"]:
                self._write(f"[bold red]error:[/] {_plain(failure)}")
            if self.json_out:
                self._clear()
                for record in data["records"]:
                    typer.echo(json.dumps(record))  # flushed line by line: a pipe sees each batch at once
            if self.rows is not None:
                self.rows += [(r["image"], r["caption"], r["logprob"]) for r in data["records"]]
            if self.bar is not None:
                self.bar.update(len(data["records"]) + len(data["failures"]))  # redraws the cleared bar

    def _start_bar(self, todo: int) -> None:
        """A bar with images/s when the run outlasts a screenful; none when stdout is a pipe of JSON lines."""
        import shutil

        from tqdm import tqdm

        piped_json = self.json_out and not sys.stdout.isatty()
        if todo > shutil.get_terminal_size().lines and not piped_json:
            self.bar = tqdm(total=todo, unit="img", dynamic_ncols=True, file=sys.stderr, disable=None)

    def summary(self, result: Any) -> None:
        """The table of a small run; for a results file, what it holds and every failure again."""
        if self.rows:
            from rich.console import Console
            from rich.table import Table

            table = Table(show_header=True)
            table.add_column("image", overflow="fold")
            table.add_column("caption")
            table.add_column("log p", justify="right")
            for image, text, logprob in self.rows:
                table.add_row(_plain(image), _plain(text), f"{logprob:.2f}")
            Console().print(table)
        if result.out is None:
            return
        self.console.print(f"captioned {result.captioned} images ({result.skipped} already done) -> "
                           f"{_plain(result.out)} ({result.records} results)")
        if result.failures:  # listed again: under a progress bar the first report has long scrolled away
            self.console.print(f"{len(result.failures)} could not be captioned:")
            for failure in result.failures:
                self.console.print(f"  {_plain(failure)}")


# ----------------------------------------------------------------------------- attend


@app.command()
@user_errors
@_with_options(DecodeSettings, "decoding", only=("beam", "max_len"), show_defaults=True)
def attend(
    patterns: Patterns,
    *,
    model: Model = None,
    checkpoint_: Checkpoint = Which.best,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: beside each image).")] = None,
    layer: Annotated[str, typer.Option(help="Decoder layer: last, all (mean), or an index.")] = "last",
    heads: Annotated[str, typer.Option(help="mean (one map per word) or all (a panel per head).")] = "mean",
    decoding: dict[str, Any],  # --beam, --max-len (DecodeSettings, config.py)
    rollout: Annotated[bool, typer.Option(help="Add the ViT encoder's attention rollout.")] = True,
    device: Annotated[Device, typer.Option()] = Device.auto,
    precision: InferPrecision = Precision.auto,
) -> None:
    """Write per-word attention overlays: where the decoder looked while writing each word."""
    from captioner.api import Captioner, collect_images
    from captioner.attend import explain_files
    from captioner.overlay import parse_layer

    layer_choice = parse_layer(layer)
    if heads not in ("mean", "all"):
        raise ConfigError(f"--heads must be mean or all, got {heads!r}")
    settings = _settings(decoding)
    paths, problems = collect_images(patterns)
    for problem in problems:
        _err(str(problem))
    if not paths:
        raise typer.Exit(1)
    captioner = Captioner.load(model, which=checkpoint_.value, device=device.value, precision=precision.value)
    written, failures = explain_files(captioner, paths, settings, out=out, layer=layer_choice, heads=heads,
                                      rollout=rollout)
    for failure in failures:
        _err(str(failure))
    from rich.console import Console

    console = Console(soft_wrap=True)  # paths stay whole, to copy or to parse
    for path, caption_text, files in written:
        console.print(f"[bold]{_plain(path)}[/]: {_plain(caption_text)}")
        for kind, file in files.items():
            console.print(f"  {_plain(kind)}: {_plain(file)}")
    if problems or failures:
        raise typer.Exit(1)


# ----------------------------------------------------------------------------- evaluate


@app.command()
@user_errors
@_with_options(DecodeSettings, "decoding", only=("beam", "max_len", "cuda_graph", "compile"), show_defaults=True)
def evaluate(
    *,
    model: Model = None,
    checkpoint_: Checkpoint = Which.best,
    data: Annotated[str | None, typer.Option(help="Dataset (default: the one the run was trained on).")] = None,
    image_dir: ImageDir = None,
    format: Annotated[Format, typer.Option(help="Dataset format.")] = Format.auto,
    split: Annotated[Split, typer.Option(help="Which split to decode.")] = Split.test,
    predictions: Annotated[Path | None, typer.Option(help="Score this COCO results file instead of a model.")] = None,
    decoding: dict[str, Any],  # --beam, --max-len, --cuda-graph, --compile (DecodeSettings, config.py)
    limit: Annotated[int | None, typer.Option(min=1, help="Only the first N images of the split.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=1024)] = 64,
    java: Annotated[bool | None, typer.Option("--java/--no-java",
                                              help="PTB tokenizer + METEOR via Java (default: if found).")] = None,
    out: Annotated[Path | None, typer.Option(help="Where to save the generated captions (COCO results).")] = None,
    device: Annotated[Device, typer.Option()] = Device.auto,
    precision: InferPrecision = Precision.auto,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Caption metrics (BLEU, METEOR, ROUGE-L, CIDEr-D) on a split, or of a predictions file."""
    from captioner.evaluation import run_evaluate

    settings = _settings(decoding)
    result = run_evaluate(model=model, data=data, image_dir=image_dir, format=format.value, split=split.value,
                          predictions=predictions, settings=settings, limit=limit, batch_size=batch_size,
                          java=java, out=out, device=device.value, precision=precision.value,
                          which=checkpoint_.value)
    summary = result.report.summary()
    if json_out:
        typer.echo(json.dumps({**summary, "tokenizer": result.report.tokenizer, "notes": result.report.notes,
                               "split": split.value, "results_file": str(result.results_file or "")}))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for note in result.report.notes:
        console.print(f"[yellow]note:[/] {_plain(note)}")
    table = Table(title=_plain(result.title))
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)
    if result.results_file:
        console.print(f"captions saved to {_plain(result.results_file)}")


# ----------------------------------------------------------------------------- data


@data_app.command("synth")
@user_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write images/ and captions.json into.")],
    n: Annotated[int, typer.Option(min=1, max=1_000_000, help="Number of scenes.")] = 100,
    split: Annotated[Split, typer.Option(help="Which split of the world to draw from.")] = Split.train,
    seed: Annotated[int, typer.Option(help="World seed.")] = 0,
    image_size: Annotated[int, typer.Option(min=32, max=1024)] = 96,
) -> None:
    """Write scenes of the built-in world to disk in COCO captions format (plus object boxes)."""
    from captioner.data.synthetic import write_synthetic

    path = write_synthetic(out, n, split=split.value, seed=seed, image_size=image_size)
    typer.echo(printable(f"wrote {n} {split.value} scenes to {out} (annotations: {path})"))


@data_app.command("check")
@user_errors
def data_check(
    data: Annotated[str, typer.Option(help="Dataset annotations file.")],
    image_dir: Annotated[str | None, typer.Option("--images", help="Image folder.")] = None,
    format: Annotated[Format, typer.Option(help="Dataset format.")] = Format.auto,
    min_count: Annotated[int | None, typer.Option(min=1, help=(
        "Minimum word count for the vocabulary (default: what training would use for this dataset)."))] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the same facts as one JSON object.")] = False,
) -> None:
    """Dry run: images found/missing, images and captions per split, caption lengths, vocabulary size."""
    from captioner.data.sources import dataset_report, load_samples

    samples = load_samples(data, image_dir=image_dir, format=format.value)
    report = dataset_report(samples, vocab_min_count=min_count)
    if json_out:
        typer.echo(json.dumps(report, default=str))
    else:
        _show_dataset_report(report)
    if report.get("images_missing") or report.get("images_unreadable"):
        raise typer.Exit(1)


def _show_dataset_report(report: dict[str, Any]) -> None:
    """`data check`'s report as tables: counts per split, caption statistics, then vocabulary and notes."""
    from rich.console import Console
    from rich.table import Table

    def number(value: float) -> str:
        return f"{value:,}" if isinstance(value, int) or value != int(value) else f"{int(value):,}"

    console = Console(highlight=False, soft_wrap=True)
    console.print(f"[bold]{_plain(report['source'])}[/] ({_plain(report['format'])})")
    counts = Table(title="counts")
    counts.add_column("split")
    counts.add_column("images", justify="right")
    counts.add_column("captions", justify="right")
    for split, images in report["splits"].items():
        counts.add_row(split, number(images), number(report["split_captions"][split]))
    counts.add_section()
    counts.add_row("all", number(report["images"]), number(report["captions"]), style="bold")
    console.print(counts)
    stats = Table(title="captions")
    stats.add_column("")
    for column in ("min", "median", "max"):
        stats.add_column(column, justify="right")
    for label, key in (("per image", "captions_per_image"), ("length (words)", "caption_length")):
        summary = report[key]
        stats.add_row(label, *(number(summary[c]) if c in summary else "-" for c in ("min", "median", "max")))
    console.print(stats)
    console.print(f"vocabulary: {number(report['vocab_size'])} tokens (specials included) from the "
                  f"{report['vocab_from']} captions' {number(report['distinct_words'])} distinct words, "
                  f"at min count {report['vocab_min_count']}, at most {number(report['vocab_max_size'])}")
    found = f"images: {number(report['images_found'])} usable"
    problems = f", {report['images_missing']} missing, {report['images_unreadable']} unreadable"
    console.print(found + problems if report["images_missing"] or report["images_unreadable"] else found)
    for example in report.get("missing_examples", []):
        console.print(f"[red]missing:[/] {_plain(example)}")
    for example in report.get("unreadable_examples", []):
        console.print(f"[red]unreadable:[/] {_plain(example)}")
    for note in report["notes"]:
        console.print(f"[yellow]note:[/] {_plain(note)}")
    for warning in report["warnings"]:
        console.print(f"[bold red]warning:[/] {_plain(warning)}")


# ----------------------------------------------------------------------------- serve


@app.command()
@user_errors
@_with_options(ServeSettings, "limits", show_defaults=True)
@_with_options(DecodeSettings, "decoding", only=("cuda_graph", "compile"), show_defaults=True)
def serve(
    *,
    model: Model = None,
    checkpoint_: Checkpoint = Which.best,
    host: Annotated[str, typer.Option(help="Address to listen on; any but loopback needs --token or --no-auth.")
                    ] = "127.0.0.1",
    token: Annotated[str | None, typer.Option(envvar="CAPTIONER_TOKEN", show_default=False, help=(
        "Bearer token every /v1 request must carry (Authorization: Bearer ...); the variable keeps it out of ps."))
    ] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve a non-loopback host with no token (e.g. behind "
                                          "a proxy that authenticates).")] = False,
    cors: Annotated[list[str] | None, typer.Option("--cors", metavar="ORIGIN", help="Let pages from ORIGIN call "
                                                   "the API (repeatable; default: none).")] = None,
    limits: dict[str, Any],  # --port, --max-upload-mb, --max-batch ... (ServeSettings, serve/settings.py)
    decoding: dict[str, Any],  # --compile, --cuda-graph for every request (DecodeSettings, config.py)
    device: Annotated[Device, typer.Option()] = Device.auto,
    precision: InferPrecision = Precision.auto,
) -> None:
    """Serve a web page and a JSON API (docs at /docs) that caption uploaded images and show the attention."""
    from captioner.serve import missing_extra

    problem = missing_extra()
    if problem:
        raise ConfigError(problem)
    from captioner.serve.server import serve as run_server

    settings = ServeSettings(host=host, token=token, no_auth=no_auth, cors=tuple(cors or ()),
                             decoding=_settings(decoding), **_given(limits))
    run_server(settings, model=model, which=checkpoint_.value, device=device.value, precision=precision.value)


def main() -> None:
    """Entry point of the `captioner` console script."""
    app()


if __name__ == "__main__":
    main()
