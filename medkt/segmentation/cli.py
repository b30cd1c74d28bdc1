"""CLI commands of the segmentation area: ``medkt metrics``."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from medkt.errors import MedktError


def metrics_command(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted mask images (PNG): 0/1 or 0/255, or see --label/--threshold."),
    gt: Path = typer.Option(..., "--gt", help="Folder of ground-truth masks with the same file names (0/1 or 0/255, or see --gt-label)."),
    label: Optional[int] = typer.Option(None, "--label", help="Predictions are label maps: this value is the foreground."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Predictions are grey probability maps: foreground = value > T (0..1; 8-bit divided by 255)."),
    gt_label: Optional[int] = typer.Option(None, "--gt-label", help="Ground truths are label maps: this value is the foreground."),
    nsd_tolerance: float = typer.Option(2.0, "--nsd-tolerance", help="NSD boundary tolerance in pixels (mm with --spacing)."),
    spacing: Optional[str] = typer.Option(None, "--spacing", help="Pixel size 'ROW_MM,COL_MM'; the NSD tolerance is then in mm."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write one CSV row per image: name,dsc,nsd,iou (fractions)."),
) -> None:
    """Score predicted masks against ground truth: mean DSC, NSD and IoU (empty+empty = 1, one empty = 0).

    Masks with values other than 0/1 or 0/255 are refused unless --label (label maps) or
    --threshold (probability maps) says how to read them.
    """
    from medkt.segmentation.metrics import score_folders

    try:
        sp = None
        if spacing:
            try:
                sp = [float(v) for v in spacing.split(",")]
            except ValueError:
                raise MedktError(f"--spacing {spacing!r}: expected two numbers like '0.7,0.7'") from None
            if len(sp) != 2:
                raise MedktError(f"--spacing {spacing!r}: expected two numbers like '0.7,0.7'")
        if label is not None and threshold is not None:
            raise MedktError("--label (label maps) and --threshold (probability maps) exclude each other; pass one")
        table = score_folders(pred, gt, nsd_tolerance=nsd_tolerance, spacing=sp, label=label, threshold=threshold,
                              gt_label=gt_label)
        if out is not None:
            table.write_csv(out)
    except MedktError as exc:
        typer.echo(f"error: {' '.join(str(exc).split())}", err=True)
        # SystemExit, not typer.Exit: medkt's main() runs the app with standalone_mode=False, where
        # click returns typer.Exit's code instead of exiting with it
        sys.exit(2)
    m = table.means()
    unit = "mm" if sp else "px"
    typer.echo(f"images: {len(table)}")
    typer.echo(f"DSC: {m['dsc']:.4f}")
    typer.echo(f"NSD@{nsd_tolerance:g}{unit}: {m['nsd']:.4f}")
    typer.echo(f"IoU: {m['iou']:.4f}")
    if out is not None:
        typer.echo(f"per-image scores: {out}")


def register(app: typer.Typer) -> None:
    """Add the segmentation commands to the ``medkt`` app."""
    app.command("metrics")(metrics_command)
