"""Finding and running medkt's MONAI bundles.

A bundle is a folder ``<name>/configs/{metadata.json, transfer.json, logging.conf}`` plus
``docs/README.md`` and ``LICENSE``. Search path: ``$MEDKT_BUNDLES`` (``os.pathsep``-separated),
``./bundles`` and the ``bundles/`` folder of the medkt checkout. Running goes through MONAI's
``ConfigWorkflow``, exactly as ``python -m monai.bundle run`` does, so both entry points behave
the same.

Before MONAI and torch are imported, `run_bundle` runs the preflight of
`medkt.preflight` (JSON, ``--set`` keys, device, weights, manifests, SAM checkpoint, run
folder) and reports every problem found at once.

Errors: a medkt error (`MedktError`) is one line naming the config id, the
value, the expected form and where it was set (bundle file or ``--set``), exit code 2. Under
``python -m monai.bundle run`` the same holds: importing this module there (every bundle lists
``$import medkt.bundles``) installs an exception hook that prints that line instead of MONAI's
traceback and exits with 2; other errors keep their traceback. A syntax error in a bundle JSON
names the file, line and column under ``medkt transfer``; under ``monai.bundle run`` MONAI parses
the file before medkt is imported, so there it stays MONAI's (json's) message.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medkt.config_files import attach_source, locate, parse_override, read_json  # noqa: F401 (re-exported)
from medkt.errors import ConfigError, MedktError, PreflightError, unknown_name

REPO_BUNDLES = Path(__file__).resolve().parent.parent / "bundles"
DEFAULT_CONFIG = "transfer.json"


@dataclass
class BundleInfo:
    """A bundle found on disk: ``name`` (its folder name), ``path`` (the bundle folder), and the
    ``description`` and ``version`` of its ``configs/metadata.json``."""

    name: str
    path: Path
    description: str
    version: str

    @property
    def configs(self) -> list[str]:
        """File names of the bundle's runnable configs (``configs/*.json`` but metadata), sorted."""
        return sorted(p.name for p in (self.path / "configs").glob("*.json") if p.name != "metadata.json")


def search_path() -> list[Path]:
    """Existing bundle roots in search order: ``$MEDKT_BUNDLES``, ``./bundles``, the checkout's ``bundles/``."""
    paths = [Path(p) for p in os.environ.get("MEDKT_BUNDLES", "").split(os.pathsep) if p]
    paths += [Path.cwd() / "bundles", REPO_BUNDLES]
    out: list[Path] = []
    for p in paths:
        if p.is_dir() and p.resolve() not in [q.resolve() for q in out]:
            out.append(p)
    return out


def _info(path: Path) -> BundleInfo:
    meta_path = path / "configs" / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{meta_path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(f"bundle {path} has no readable configs/metadata.json ({exc})") from None
    return BundleInfo(meta.get("name", path.name) and path.name, path, meta.get("description", ""), meta.get("version", "?"))


def list_bundles() -> list[BundleInfo]:
    """Every readable bundle on `search_path`; a name found twice keeps the first root's."""
    found: dict[str, BundleInfo] = {}
    for root in search_path():
        for meta in sorted(root.glob("*/configs/metadata.json")):
            b = meta.parent.parent
            if b.name not in found:
                try:
                    found[b.name] = _info(b)
                except ConfigError:
                    continue
    return list(found.values())


def find_bundle(name_or_path: str) -> BundleInfo:
    """A bundle by folder path or by name on `search_path`; unknown -> `ConfigError`."""
    p = Path(name_or_path)
    if (p / "configs" / "metadata.json").is_file():
        return _info(p)
    if p.is_absolute() or os.sep in name_or_path:
        raise ConfigError(f"{name_or_path} is not a bundle folder (no configs/metadata.json inside)")
    known = {b.name: b for b in list_bundles()}
    if name_or_path not in known:
        raise unknown_name("bundle", name_or_path, list(known))
    return known[name_or_path]


def _find_user_error(exc: BaseException) -> MedktError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedktError):
            return exc
        if isinstance(exc, OSError):  # a read-only / full disk outside the atomic writers
            from medkt.errors import disk_error

            err = disk_error(exc, exc.filename or "the run folder")
            if err is not None:
                return err
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def default_run_dir(bundle_name: str, root: str | Path = "runs") -> str:
    """A fresh ``<root>/<bundle>-YYYYmmdd-HHMMSS[-k]`` path (neither it nor its ``.partial`` exists)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(root) / f"{bundle_name}-{stamp}"
    k = 1
    while path.exists() or path.with_name(path.name + ".partial").exists():
        path = Path(root) / f"{bundle_name}-{stamp}-{k}"
        k += 1
    return str(path)


def run_bundle(bundle: str, overrides: dict[str, Any] | None = None, config: str = DEFAULT_CONFIG,
               output: str | Path | None = None, overwrite: bool = False, resume: bool = False,
               restart: bool = False) -> dict[str, Any]:
    """Run a bundle's workflow; returns the run's ``results.json`` content.

    ``resume`` continues the interrupted run in ``<output>.partial``; ``restart`` discards it
    (see `medkt.pipelines.base.Pipeline`).
    """
    info = find_bundle(bundle)  # before importing MONAI (seconds): an unknown bundle fails at once
    cfg_path = info.path / "configs" / config
    if not cfg_path.is_file():
        raise ConfigError(f"bundle {info.name} has no config {config!r}; available: {info.configs}")
    base = info.path / "configs" / DEFAULT_CONFIG
    # extra configs (ablations) are layered on top of transfer.json, as MONAI does with a list
    files = [str(base), str(cfg_path)] if cfg_path != base and base.is_file() else [str(cfg_path)]
    overrides = dict(overrides or {})
    for key in ("unlabeled", "self_training"):  # ``--set unlabeled=PATH``: pipeline arguments no bundle lists at the top level
        if key in overrides:
            overrides[f"pipeline#{key}"] = overrides.pop(key)
    out = str(output) if output is not None else default_run_dir(info.name)
    # before importing MONAI and torch (10-30 s): JSON syntax, --set keys, device, weights,
    # manifests, SAM checkpoint, run folder; every problem at once (medkt.preflight)
    from medkt.preflight import preflight_bundle, raise_problems

    raise_problems(preflight_bundle(files, overrides, bundle_name=info.name, output=out, overwrite=overwrite,
                                    resume=resume, restart=restart))
    from monai.bundle import ConfigWorkflow

    logging_conf = info.path / "configs" / "logging.conf"
    workflow = ConfigWorkflow(config_file=files, meta_file=str(info.path / "configs" / "metadata.json"),
                              logging_file=str(logging_conf) if logging_conf.is_file() else False,
                              workflow_type=None)
    workflow.parser.update({"output_dir": out, "overwrite": overwrite, "resume": resume,
                            "bundle_name": info.name, **overrides})
    if restart:  # bundles do not list it; it goes straight to the pipeline's arguments
        if not isinstance(workflow.parser.get("pipeline"), dict):
            raise ConfigError(f"bundle {info.name} has no 'pipeline' section to pass --restart to; "
                              f"delete {out}.partial by hand instead")
        workflow.parser["pipeline#restart"] = True
    try:
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    except Exception as exc:  # MONAI wraps errors of _target_/$ items in RuntimeError
        user_error = _find_user_error(exc)
        if user_error is not None:
            attach_source(user_error, files, overrides)
            raise user_error from None
        raise
    results_path = Path(workflow.parser.get_parsed_content("output_dir")) / "results.json"
    return json.loads(results_path.read_text()) if results_path.is_file() else {}


def _monai_cli_args(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Config files and ``--id value`` overrides of a ``python -m monai.bundle run`` command line."""
    files: list[str] = []
    overrides: dict[str, Any] = {}
    skip = {"meta_file", "logging_file", "run_id", "init_id", "final_id", "tracking", "args_file", "workflow_type"}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            if not eq and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            if name == "config_file":
                try:
                    parsed = json.loads(value.replace("'", '"')) if value.startswith("[") else value
                except ValueError:
                    parsed = value
                files += [str(v) for v in parsed] if isinstance(parsed, list) else [str(parsed)]
            elif name not in skip:
                try:
                    overrides[name] = json.loads(value)
                except ValueError:
                    overrides[name] = value
        i += 1
    return files, overrides


def _monai_bundle_excepthook(exc_type: type, exc: BaseException, tb: Any) -> None:
    user_error = _find_user_error(exc)
    if user_error is None:
        return _previous_excepthook(exc_type, exc, tb)
    import sys

    files, overrides = _monai_cli_args(sys.argv[1:])
    attach_source(user_error, files, overrides, flag="--")
    _exit_with([user_error])


def _exit_with(errors: list[MedktError]) -> None:
    """Print one ``error:`` line per problem and exit with code 2 (from inside MONAI's run)."""
    import atexit
    import sys

    for e in errors:
        for p in (e.problems if isinstance(e, PreflightError) else [e]):
            sys.stderr.write(f"error: {' '.join(str(p).split())}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    atexit._run_exitfuncs()  # what a normal exit would run (logging shutdown, temp files)
    os._exit(2)  # an uncaught exception would make it 1; user errors are 2 as with `medkt`


def _monai_run_preflight() -> None:
    """The preflight of ``python -m monai.bundle run`` (MONAI and torch are loaded by then, so
    here it gathers the problems rather than saving time): runs when a bundle's ``imports``
    load this module, before any pipeline is built; exits with every problem found."""
    import sys

    if sys.argv[1:2] != ["run"]:
        return
    files, overrides = _monai_cli_args(sys.argv[2:])
    if not files:
        return
    from medkt.preflight import preflight_bundle

    control = {k: overrides.pop(k) for k in ("output_dir", "overwrite", "resume") if k in overrides}
    restart = overrides.get("pipeline#restart") is True
    try:
        name = json.loads(Path(files[0]).read_text()).get("bundle_name", "")
    except (OSError, ValueError, AttributeError):
        name = ""
    output = control.get("output_dir")
    problems = preflight_bundle(files, {**overrides, **control}, bundle_name=name or Path(files[0]).parent.parent.name,
                                output=output, overwrite=control.get("overwrite") is True,
                                resume=control.get("resume") is True, restart=restart, flag="--")
    if problems:
        _exit_with(problems)


def _under_monai_bundle_cli() -> bool:
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", None) == "monai.bundle.__main__"


_previous_excepthook = None
if _under_monai_bundle_cli():  # imported by a bundle's "imports" under `python -m monai.bundle run`
    import sys as _sys

    if _sys.excepthook is not _monai_bundle_excepthook:
        _previous_excepthook = _sys.excepthook
        _sys.excepthook = _monai_bundle_excepthook
    _monai_run_preflight()
