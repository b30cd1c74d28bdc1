"""``medkt`` command line (typer).

User errors (`MedktError`) print one line and exit with code 2; ``--debug``
shows the traceback. Feature areas add their own commands through modules with
``register(app)`` declared as entry points of the group `COMMAND_GROUP`.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from medkt.device import DEVICE_HELP, PRECISION_HELP
from medkt.errors import ConfigError, DataError, MedktError, PreflightError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="medkt: teach vision-language models new visual concepts from text (knowledge transfer).")

#: entry-point group of ``register(app)`` functions that add commands (``pyproject.toml``:
#: data, segmentation, phantom); a third-party package adds its commands the same way
COMMAND_GROUP = "medkt.commands"

_STATE = {"debug": False}


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
          threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's).")) -> None:
    _STATE["debug"] = debug
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    if threads:
        import torch

        torch.set_num_threads(threads)


def _parse_sets(sets: list[str]) -> dict:
    from medkt.config_files import parse_override

    return dict(parse_override(s) for s in sets)


def _config_from_options(cls: type, options: dict, sets: list[str], path: str):
    """``cls.from_dict`` of command-line options plus ``--set`` overrides; an error names the
    ``--set`` (or option) the bad value came from."""
    overrides = _parse_sets(sets)
    try:
        return cls.from_dict({**options, **overrides})
    except ConfigError as exc:
        field = (exc.key or "").split("#")[1] if (exc.key or "").startswith(path + "#") else None
        if field in overrides and exc.source is None:
            raw = overrides[field]
            exc.source = f"from --set {field}={raw if isinstance(raw, str) else json.dumps(raw)}"
        elif field in options and exc.source is None:
            exc.source = f"from --{field.replace('_', '-')}"
        raise


@app.command()
def transfer(
    bundle: str = typer.Option(..., "--bundle", "-b", help="Bundle name (see `medkt bundles`) or path to a bundle folder."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Run folder (default: runs/<bundle>-<timestamp>)."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Config override key=value (MONAI ids, '#' or '.' separated)."),
    config: str = typer.Option("transfer.json", "--config", help="Config file of the bundle (e.g. an ablation)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run folder."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (OUTPUT.partial) from its checkpoints."),
    restart: bool = typer.Option(False, "--restart", help="Discard an interrupted run (OUTPUT.partial) and start over."),
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP + " (default: the bundle's device)."),
    precision: Optional[str] = typer.Option(None, "--precision",
                                            help=PRECISION_HELP + " (default: the bundle's precision)."),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable",
                                         help="Leave missing or undecodable evaluation images out (listed in "
                                              "RUN/skipped_images.txt) instead of stopping."),
) -> None:
    """Run a knowledge-transfer bundle: inversion -> fine-tuning -> evaluation before/after."""
    from medkt.bundles import run_bundle

    overrides = _parse_sets(set_)
    if skip_unreadable:
        overrides["pipeline#skip_unreadable"] = True
    # --device / --precision are the bundle's top-level keys (same as --set device=...)
    overrides.update({k: v for k, v in (("device", device), ("precision", precision)) if v is not None})
    try:
        results = run_bundle(bundle, overrides, config=config, output=output, overwrite=overwrite, resume=resume,
                             restart=restart)
    except ConfigError as exc:
        if skip_unreadable and "'skip_unreadable'" in str(exc):  # a pipeline without manifest evaluations
            raise ConfigError(f"--skip-unreadable: bundle {bundle!r} does not evaluate on images listed in a manifest "
                              "(its pipeline has no such option); run it without the flag") from None
        raise
    from medkt.distributed import env_from_torchrun

    if not env_from_torchrun().is_main:  # under torchrun the table is printed once, by rank 0
        return
    for w in results.get("warnings") or []:  # forgetting warnings first (medkt.evaluation.forgetting_warnings)
        typer.echo(w)
    summary = results.get("summary_table")
    if summary:
        typer.echo(summary)
    else:
        _print_eval_summary(results)


def _print_eval_summary(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    evals = results.get("evaluations") or {}
    console = Console()
    for name, ev in evals.items():
        table = Table(title=f"{name}: zero-shot accuracy (%)")
        for col in ("class", "before", "after", "change"):
            table.add_column(col, justify="left" if col == "class" else "right")
        b, a = ev["before"], ev["after"]
        for c, v in b["per_class"].items():
            av = a["per_class"].get(c, float("nan"))
            table.add_row(c, f"{100 * v:.1f}", f"{100 * av:.1f}", f"{100 * (av - v):+.1f}")
        table.add_row("top-1 (all)", f"{100 * b['accuracy']:.1f}", f"{100 * a['accuracy']:.1f}",
                      f"{100 * (a['accuracy'] - b['accuracy']):+.1f}")
        console.print(table)
    if "seconds_transfer" in results:
        console.print(f"inversion + fine-tuning: {results['seconds_transfer']:.1f} s")


@app.command("bundles")
def bundles_cmd() -> None:
    """List the available bundles with a one-line description."""
    from medkt.bundles import list_bundles

    for b in list_bundles():
        typer.echo(f"{b.name:32s} {b.description.splitlines()[0] if b.description else ''}")


@app.command()
def invert(
    backend: str = typer.Option(..., help="Backend spec, e.g. clip:ViT-B-32@/models/ViT-B-32.pt"),
    concept: list[str] = typer.Option(..., "--concept", "-c", help="NAME=DESCRIPTION (repeatable)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for images/, grid.png, manifest.csv."),
    n_images: int = typer.Option(10, help="Images per concept."),
    steps: int = typer.Option(5000, help="Optimisation steps."),
    lr: float = typer.Option(0.1),
    seed: int = typer.Option(0),
    set_: list[str] = typer.Option([], "--set", "-s", help="Other InversionConfig fields, key=JSON value, "
                                     "e.g. priors='[{\"name\": \"tv\", \"weight\": 0.01}]'."),
    resume: bool = typer.Option(False, help="Continue from the checkpoints in OUTPUT (refused if they were made "
                                            "with other settings or concepts)."),
    checkpoint_every: int = typer.Option(200, help="Checkpoint interval in steps (0 = off)."),
    unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help=(
        "Unlabeled scans of the modality (a folder of images or a manifest; labels are never read) for the "
        "priors that learn from them, e.g. --set 'priors=[{\"name\": \"tv\"}, {\"name\": \"feature_stats\"}]'; "
        "their statistics are cached in OUTPUT/pool_cache.")),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
) -> None:
    """Synthesise images of concepts from their descriptions (model inversion)."""
    from medkt.backends import create_backend
    from medkt.inversion import InversionConfig, InversionTarget, invert as run_invert, save_inversion

    targets = []
    for c in concept:
        name, sep, desc = c.partition("=")
        if not sep or not name.strip() or not desc.strip():
            raise ConfigError(f"bad --concept {c!r}: expected NAME=DESCRIPTION")
        targets.append(InversionTarget(name.strip(), desc.strip(), n_images))
    from medkt.run_folder import LOCK_NAME, check_unlocked, folder_lock

    check_unlocked(output, "output folder")  # another live `medkt invert` writing there comes first
    # resuming into a folder checks the settings its checkpoints were made with (medkt.checkpoints),
    # so images of another run are never mixed with this one's: a folder without that record is refused
    if output.exists() and any(p.name != LOCK_NAME for p in output.iterdir()):
        if not resume:
            raise ConfigError(f"output folder {output} is not empty; pass --resume to continue the inversion it "
                              "holds, or choose another folder")
        if not (output / "checkpoints" / "inversion.settings.json").is_file():
            raise ConfigError(f"cannot resume into {output}: it has no record of the settings its images were made "
                              "with (checkpoints/inversion.settings.json); choose another folder")
    cfg = _config_from_options(InversionConfig, {"steps": steps, "lr": lr, "seed": seed,
                                                 "checkpoint_every": checkpoint_every}, set_, "inversion")
    pool = None
    if unlabeled is not None:
        from medkt.pool import UnlabeledPool

        pool = UnlabeledPool.from_path(unlabeled, cache_dir=output / "pool_cache")
    b = create_backend(backend, device=device, precision=precision)
    output.mkdir(parents=True, exist_ok=True)
    with folder_lock(output, "output folder"):
        result = run_invert(b, targets, cfg, out_dir=output, resume=resume, pool=pool)
        manifest = save_inversion(result, output, cfg)
    typer.echo(f"{len(result.images)} images, mean similarity {sum(result.similarities) / len(result.similarities):.3f}, "
               f"{result.seconds:.1f} s -> {manifest}")


@app.command()
def finetune(
    backend: str = typer.Option(..., help="Backend spec."),
    images: Path = typer.Option(..., help="manifest.csv written by `medkt invert`."),
    output: Path = typer.Option(..., "--output", "-o", help="Fine-tuned weights (.safetensors)."),
    negative: list[str] = typer.Option([], "--negative", "-n", help="Extra negative caption (repeatable)."),
    set_: list[str] = typer.Option([], "--set", "-s", help=(
        "FinetuneConfig fields, key=value (lr, train, ...); JSON for groups, e.g. "
        "'optimizer={\"name\": \"adamw\"}' or 'controls=[{\"name\": \"wise\", \"alpha\": 0.5}]'.")),
    overwrite: bool = typer.Option(False, "--overwrite"),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    unlabeled: Optional[Path] = typer.Option(None, "--unlabeled", help=(
        "Unlabeled pool of scans (a folder, or a manifest whose labels are never read) for the pool_distill "
        "control, e.g. --set 'controls=[{\"name\": \"pool_distill\"}]'.")),
) -> None:
    """Fine-tune the visual encoder on inverted images with InfoNCE; save the weights."""
    from medkt.backends import create_backend
    from medkt.finetune import FinetuneConfig, finetune as run_finetune, save_finetuned
    from medkt.inversion import load_inversion
    from medkt.spine import as_pool

    if output.exists() and not overwrite:
        raise ConfigError(f"{output} exists; pass --overwrite to replace it")
    cfg = _config_from_options(FinetuneConfig, {}, set_, "finetune")
    pool = as_pool(unlabeled, None) if unlabeled is not None else None  # a missing pool fails before the model loads
    b = create_backend(backend, device=device, precision=precision)
    inv = load_inversion(images, b)
    descriptions = {c: t for c, t in zip(inv.concepts, inv.texts)}
    hist = run_finetune(b, inv.images, inv.concepts, descriptions, negative, cfg, texts_of_images=inv.texts, pool=pool)
    save_finetuned(b, output, which=cfg.train)
    typer.echo(f"{hist['steps']} steps, loss {hist['loss'][0]:.4f} -> {hist['loss'][-1]:.4f} -> {output}")


@app.command()
def evaluate(
    backend: str = typer.Option(..., help="Backend spec."),
    manifest: Path = typer.Option(..., help="Dataset manifest (path,label,...)."),
    classes: Path = typer.Option(..., help="JSON file: {class: prompt or [prompts]}, or [class names] (see --template)."),
    template: list[str] = typer.Option([], "--template", help="Prompt template(s) for class names given without "
                                                              "prompts (default: 'a photo of a {}.')."),
    root: Optional[Path] = typer.Option(None, help="Data root (default: the manifest's folder)."),
    weights: Optional[Path] = typer.Option(None, help="Fine-tuned weights from `medkt finetune`."),
    split: Optional[str] = typer.Option(None),
    aggregate: str = typer.Option("mean", help="Prompt ensemble: mean | max."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write the result as JSON."),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    precision: str = typer.Option("auto", "--precision", help=PRECISION_HELP),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable",
                                         help="Leave missing or undecodable images out (listed in "
                                              "OUTPUT.skipped_images.txt, or on stderr) instead of stopping."),
) -> None:
    """Zero-shot classification accuracy (overall and per class) of a model on a manifest."""
    from medkt.backends import create_backend
    from medkt.data.manifest import read_manifest
    from medkt.evaluation import zero_shot_classify
    from medkt.finetune import check_weights_file, load_finetuned, weights_difference

    prompts = read_class_prompts(classes, template)
    if weights is not None:
        check_weights_file(weights)  # before the model is built
    b = create_backend(backend, device=device, precision=precision)
    if weights is not None:
        d = weights_difference(b, weights)
        typer.echo(f"{weights}: {d['changed_tensors']} of {d['tensors']} tensors ({d['changed_values']:,} of "
                   f"{d['values']:,} values) differ from {backend}'s weights (max |change| {d['max_abs_change']:.3g})")
        if d["changed_values"] == 0:
            typer.echo("warning: the fine-tuned weights equal the base model's: the numbers below are the base "
                       "model's (was the learning rate too small, or nothing trained?)", err=True)
        load_finetuned(b, weights)
    data_root = root or manifest.parent
    # with --skip-unreadable a missing file is one of the unreadable images, not an error
    rows = read_manifest(manifest, root, classes=list(prompts), split=split, check_files=not skip_unreadable)
    skipped: list = []
    if skip_unreadable:
        from medkt.data.manifest import readable_rows, write_skipped

        rows, skipped = readable_rows(rows, data_root, b.load_image)
        empty = [c for c in prompts if c not in {r.label for r in rows}]
        if empty:
            raise DataError(f"{manifest}: no readable images for class(es) {empty} ({len(skipped)} skipped)")
    res = zero_shot_classify(b, [data_root / r.path for r in rows], [r.label for r in rows], prompts, aggregate)
    for c, v in res.per_class.items():
        typer.echo(f"{c:30s} {100 * v:6.1f}")
    typer.echo(f"{'top-1':30s} {100 * res.accuracy:6.1f}  ({len(rows)} images)")
    if output is not None:
        from medkt.utils import atomic_write_json

        atomic_write_json(output, {**res.to_dict(), "skipped_images": len(skipped)} if skip_unreadable
                          else res.to_dict())
    if skipped:
        if output is not None:
            where = write_skipped(output.with_suffix(".skipped_images.txt"), skipped)
            typer.echo(f"skipped {len(skipped)} unreadable image(s), listed in {where}", err=True)
        else:
            typer.echo(f"skipped {len(skipped)} unreadable image(s):", err=True)
            for p in skipped:
                typer.echo(f"  {p}", err=True)


def read_class_prompts(path: Path, templates: list[str] | None = None) -> dict[str, list[str]]:
    """``--classes FILE``: a JSON object class -> prompt (a string is ONE prompt) or list of
    prompts (null: the templates), or a JSON list of class names expanded with ``templates``
    (default ``"a photo of a {}."``). Anything else is one ConfigError line naming the file."""
    from medkt.config_files import read_json
    from medkt.config_model import check, show
    from medkt.pipelines.transfer import ClassPrompts, class_prompts_of

    raw = read_json(path)
    expected = ('a JSON object {"class": "prompt" or ["prompt", ...]} or a JSON list of class names '
                '(prompts from --template)')
    try:
        check(raw, ClassPrompts, "classes")
        if not raw:
            raise ConfigError(f"classes = {json.dumps(raw)}: expected at least one class", key="classes")
        spec: dict = {"classes": raw}
        if templates:
            spec["templates"] = list(templates)
        return class_prompts_of(spec)
    except ConfigError as exc:
        if exc.key == "classes":  # the whole structure is wrong: say what is accepted
            exc = ConfigError(f"classes = {show(raw)}: expected {expected}", key="classes")
        exc.source = exc.source or f"in {path}"
        raise exc from None


def _register_feature_commands() -> None:
    from importlib import metadata

    for ep in metadata.entry_points(group=COMMAND_GROUP):
        ep.load()(app)


_register_feature_commands()


def error_lines(exc: MedktError) -> list[str]:
    """The ``error: ...`` lines of a user error: one, or one per problem of a
    `PreflightError` (every problem the preflight found)."""
    if isinstance(exc, PreflightError):
        return [f"error: {' '.join(str(p).split())}" for p in exc.problems]
    return [f"error: {exc}"]


def main() -> None:
    """Entry point: run the app, turning user errors into one line + exit code 2."""
    debug = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code instead of exiting
    except MedktError as exc:
        if debug:
            raise
        for line in error_lines(exc):
            typer.echo(line, err=True)
        sys.exit(2)
    except (FileNotFoundError, PermissionError) as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except OSError as exc:  # a read-only / full disk outside the atomic writers (mkdir, run.log, images)
        from medkt.errors import disk_error

        err = disk_error(exc, exc.filename or "the output")
        if debug or err is None:
            raise
        typer.echo(f"error: {err}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(2)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
