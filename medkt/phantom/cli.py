"""CLI commands of the phantom world: ``medkt phantom export`` and ``medkt phantom pretrain``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from medkt.errors import MedktError

phantom_app = typer.Typer(help="The built-in phantom chest X-ray world (offline demo data and model).",
                          no_args_is_help=True)


def _fail(exc: MedktError) -> None:
    typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
    sys.exit(2)


@phantom_app.command("export")
def export_command(
    output: Path = typer.Option(..., "--output", "-o", help="Data root to write images/, masks/ and manifest.csv into."),
    findings: Optional[str] = typer.Option(None, "--findings", help="Comma-separated findings (default: all registered)."),
    n: int = typer.Option(10, "--n", help="Phantoms per finding."),
    seed: int = typer.Option(0, "--seed", help="Data seed (images are deterministic in seed and index)."),
    size: int = typer.Option(64, "--size", help="Image side in pixels."),
    fmt: str = typer.Option("png", "--format", help="png (8-bit) or dicom (12-bit DX, pydicom)."),
    split: Optional[str] = typer.Option(None, "--split", help="Value of the manifest's split column."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing manifest."),
) -> None:
    """Write phantoms with masks and a medkt manifest (path,label,mask,split,sha256)."""
    from medkt.phantom.export import export_dataset
    from medkt.phantom.world import list_findings

    names = [f.strip() for f in findings.split(",")] if findings else list_findings()
    try:
        man = export_dataset(output, names, n, seed, size=size, fmt=fmt, split=split, overwrite=overwrite)
    except MedktError as exc:
        _fail(exc)
    typer.echo(f"wrote {n * len(names)} phantoms ({fmt}) and {man}")


@phantom_app.command("pretrain")
def pretrain_command(
    config: Path = typer.Option(Path(__file__).resolve().parent.parent / "assets" / "phantom" / "pretrain_config.json",
                                "--config", help="PretrainConfig JSON."),
    out: Path = typer.Option(..., "--out", help="Output .safetensors (sidecar .json written next to it)."),
    model_card: Optional[Path] = typer.Option(None, "--model-card", help="Also write MODEL_CARD.md here."),
) -> None:
    """Pretrain the phantom CLIP model (the held-out findings never appear in an image)."""
    from medkt.phantom.pretrain import main

    args = ["--config", str(config), "--out", str(out)] + (["--model-card", str(model_card)] if model_card else [])
    try:
        main(args)
    except MedktError as exc:
        _fail(exc)


def register(app: typer.Typer) -> None:
    """Add ``medkt phantom ...`` to the medkt app."""
    app.add_typer(phantom_app, name="phantom")
