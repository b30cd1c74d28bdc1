"""Finding and running medkt's MONAI bundles.

A bundle is a folder ``<name>/configs/{metadata.json, transfer.json, logging.conf}`` plus
``docs/README.md`` and ``LICENSE``. Search path: ``$MEDKT_BUNDLES`` (``os.pathsep``-separated),
``./bundles`` and the ``bundles/`` folder of the medkt checkout. Running goes through MONAI's
``ConfigWorkflow``, exactly as ``python -m monai.bundle run`` does, so both entry points behave
the same.

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

from medkt.errors import ConfigError, MedktError, did_you_mean, unknown_name

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


def parse_override(text: str) -> tuple[str, Any]:
    """``"pipeline#finetune#lr=1e-4"`` (``.`` also accepted as separator) -> (MONAI id, value).

    Values are JSON when they parse as JSON (numbers, true/false, lists, objects), else strings.
    """
    if "=" not in text:
        raise ConfigError(f"bad override {text!r}: expected key=value, e.g. --set pipeline#finetune#lr=1e-4")
    key, _, raw = text.partition("=")
    key = key.strip().replace(".", "#")
    if not key:
        raise ConfigError(f"bad override {text!r}: empty key")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _find_user_error(exc: BaseException) -> MedktError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, MedktError):
            return exc
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
    for f in files:
        read_json(f)  # a syntax error names the file, line and column (MONAI's loader does not)
    from monai.bundle import ConfigWorkflow

    logging_conf = info.path / "configs" / "logging.conf"
    overrides = dict(overrides or {})
    out = str(output) if output is not None else default_run_dir(info.name)
    workflow = ConfigWorkflow(config_file=files, meta_file=str(info.path / "configs" / "metadata.json"),
                              logging_file=str(logging_conf) if logging_conf.is_file() else False,
                              workflow_type=None)
    for key in overrides:
        parent = key.rpartition("#")[0]
        # a new field inside an existing dict is allowed (e.g. inversion#chunk_size); the
        # pipeline validates field names, so typos still fail there with the known options
        if key not in workflow.parser and not (parent and parent in workflow.parser
                                                and isinstance(workflow.parser.get(parent), dict)):
            top = sorted(k for k in workflow.parser.get() if not k.startswith("_"))
            raise ConfigError(f"unknown config key {key!r} in bundle {info.name}.{did_you_mean(key.split('#')[0], top)} "
                              f"Top-level keys: {', '.join(top)}", key=key, source=f"from --set {_show_override(key, overrides[key])}")
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


# -- where a config value came from (for one-line errors) ---------------------------------------
def read_json(path: str | Path) -> Any:
    """A JSON config file; a syntax error is one line ``FILE:LINE:COL: invalid JSON: ...``."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read bundle config {path}: {exc.strerror or exc}") from None


def _show_override(key: str, value: Any) -> str:
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def _walk(doc: Any, parts: list[str]) -> tuple[bool, Any]:
    for p in parts:
        if isinstance(doc, dict) and p in doc:
            doc = doc[p]
        elif isinstance(doc, list) and p.isdigit() and int(p) < len(doc):
            doc = doc[int(p)]
        else:
            return False, None
    return True, doc


def locate(key: str, files: list[str], overrides: dict[str, Any], flag: str = "--set") -> tuple[str, str | None]:
    """Where config id ``key`` (as a pipeline reports it: ``pipeline#seed``, ``inversion#steps``)
    is set: ``(id the user wrote, "from --set K=V" or "in FILE")``. ``@ref`` links are followed
    (``pipeline#seed`` = ``"@seed"`` -> ``seed``); ids are also tried under ``pipeline#``."""
    docs = []
    for f in files:
        try:
            docs.append((f, json.loads(Path(f).read_text())))
        except (OSError, ValueError):
            continue

    def lookup(parts: list[str]) -> tuple[bool, Any]:
        ident = "#".join(parts)
        if ident in overrides:
            return True, overrides[ident]
        for _, doc in reversed(docs):
            found, value = _walk(doc, parts)
            if found:
                return True, value
        return False, None

    parts = key.split("#")
    if not lookup(parts[:1])[0] and parts[0] != "pipeline" and lookup(["pipeline", parts[0]])[0]:
        parts = ["pipeline", *parts]
    for _ in range(16):  # follow "@id" references
        for i in range(len(parts), 0, -1):
            found, value = lookup(parts[:i])
            if found:
                break
        else:
            break
        if isinstance(value, str) and value.startswith("@") and len(value) > 1:
            parts = value[1:].split("#") + parts[i:]
            continue
        break
    ident = "#".join(parts)
    for o, v in overrides.items():
        if ident == o or ident.startswith(o + "#"):
            shown = _show_override(o, v)
            return ident, f"from --set {shown}" if flag == "--set" else f"from --{shown.replace('=', ' ', 1)}"
    for f, doc in reversed(docs):
        for i in range(len(parts), 0, -1):
            if _walk(doc, parts[:i])[0]:
                return ident, f"in {f}"
    return ident, (f"in {files[-1]}" if files else None)


def attach_source(exc: MedktError, files: list[str], overrides: dict[str, Any], flag: str = "--set") -> None:
    """Name the file or override a `ConfigError` with a ``key`` came from, and rewrite the
    key to the id the user wrote (``pipeline#seed`` -> ``seed``). ``flag``: how overrides were
    given (``"--set"`` for ``medkt``, ``"--"`` for ``monai.bundle run``'s ``--ID VALUE``)."""
    if not isinstance(exc, ConfigError) or not exc.key or exc.source:
        return
    ident, source = locate(exc.key, files, overrides, flag)
    if ident != exc.key and exc.args:
        exc.args = (str(exc.args[0]).replace(exc.key, ident, 1), *exc.args[1:])
        exc.key = ident
    exc.source = source


# -- python -m monai.bundle run: a medkt error is one line, exit code 2 --------------------------
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
    import atexit
    import sys

    files, overrides = _monai_cli_args(sys.argv[1:])
    attach_source(user_error, files, overrides, flag="--")
    sys.stderr.write(f"error: {' '.join(str(user_error).split())}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    atexit._run_exitfuncs()  # what a normal exit would run (logging shutdown, temp files)
    os._exit(2)  # an uncaught exception would make it 1; user errors are 2 as with `medkt`


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
