"""``medkt data`` commands: build and check dataset manifests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def _parse_options(options: list[str]) -> dict:
    from medkt.errors import ConfigError

    out = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad --set {item!r}: expected key=value")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def register(app: typer.Typer) -> None:
    """Add the ``medkt data`` commands (prepare, list, check) to the CLI ``app``."""
    data = typer.Typer(no_args_is_help=True, help="Dataset manifests: build them from downloaded data, list preparers, check them.")

    @data.command("prepare")
    def prepare_cmd(
        name: str = typer.Argument(..., help="Dataset name (see `medkt data list`)."),
        root: Path = typer.Option(..., "--root", help="Folder holding the downloaded dataset."),
        out: Optional[Path] = typer.Option(None, "--out", help="Manifest file (.csv or .jsonl); default ROOT/NAME.csv."),
        sha256: bool = typer.Option(False, "--sha256", help="Record each file's SHA-256 in the manifest."),
        set_: list[str] = typer.Option([], "--set", "-s", help="Preparer option key=value (e.g. seed=1)."),
    ) -> None:
        """Build the manifest of a downloaded dataset (written atomically)."""
        from collections import Counter

        from medkt.data.manifest import read_manifest
        from medkt.data.prepare import prepare

        skipped: list[Path] = []
        path = prepare(name, root, out, sha256=sha256, skipped=skipped, **_parse_options(set_))
        rows = read_manifest(path, root)
        counts = Counter(r.label for r in rows)
        typer.echo(f"{path}: {len(rows)} images; " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        if skipped:
            names = ", ".join(p.relative_to(root).as_posix() for p in skipped[:5])
            typer.echo(f"skipped {len(skipped)} file(s) that are not images: {names}"
                       f"{' ...' if len(skipped) > 5 else ''}")

    @data.command("list")
    def list_cmd() -> None:
        """List the datasets `medkt data prepare` knows."""
        from medkt.data.prepare import list_preparers

        for name, doc in list_preparers().items():
            typer.echo(f"{name:24s} {doc}")

    @data.command("check")
    def check_cmd(
        manifest: Path = typer.Argument(..., help="Manifest (.csv/.jsonl)."),
        root: Optional[Path] = typer.Option(None, "--root", help="Data root (default: the manifest's folder)."),
        read_images: bool = typer.Option(True, "--read/--no-read", help="Decode every image, not only check it exists."),
        verify_hashes: bool = typer.Option(False, "--sha256", help="Verify the sha256 column."),
        skip_bad: bool = typer.Option(False, "--skip-bad", help="Report bad rows and count them instead of stopping."),
    ) -> None:
        """Validate a manifest: paths inside the root, files present and decodable."""
        from medkt.data.manifest import ManifestProblem, read_manifest
        from medkt.data.readers import read_image
        from medkt.errors import DataError

        problems: list[ManifestProblem] = []
        base = root if root is not None else manifest.parent
        rows = read_manifest(manifest, base, skip_bad=skip_bad, problems=problems, verify_hashes=verify_hashes)
        ok = 0
        for r in rows:
            if read_images:
                try:
                    read_image(base / r.path)
                except DataError as exc:
                    if not skip_bad:
                        raise DataError(f"{r.source}: {exc}") from None
                    problems.append(ManifestProblem(r.source or r.path, str(exc)))
                    continue
            ok += 1
        for p in problems:
            typer.echo(f"skipped {p}", err=True)
        typer.echo(f"{manifest}: {ok} good rows, {len(problems)} skipped")

    app.add_typer(data, name="data")
