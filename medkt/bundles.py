"""Finding and running medkt's MONAI bundles.

A bundle is a folder ``<name>/configs/{metadata.json, transfer.json, logging.conf}`` plus
``docs/README.md`` and ``LICENSE``. Search path: ``$MEDKT_BUNDLES`` (``os.pathsep``-separated),
``./bundles`` and the ``bundles/`` folder of the medkt checkout. Running goes through MONAI's
``ConfigWorkflow``, exactly as ``python -m monai.bundle run`` does, so both entry points behave
the same.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medkt.errors import ConfigError, MedktError, unknown_name

REPO_BUNDLES = Path(__file__).resolve().parent.parent / "bundles"
DEFAULT_CONFIG = "transfer.json"


@dataclass
class BundleInfo:
    name: str
    path: Path
    description: str
    version: str

    @property
    def configs(self) -> list[str]:
        return sorted(p.name for p in (self.path / "configs").glob("*.json") if p.name != "metadata.json")


def search_path() -> list[Path]:
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
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"bundle {path} has no readable configs/metadata.json ({exc})") from None
    return BundleInfo(meta.get("name", path.name) and path.name, path, meta.get("description", ""), meta.get("version", "?"))


def list_bundles() -> list[BundleInfo]:
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
    (see :class:`medkt.pipelines.base.Pipeline`).
    """
    from monai.bundle import ConfigWorkflow

    info = find_bundle(bundle)
    cfg_path = info.path / "configs" / config
    if not cfg_path.is_file():
        raise ConfigError(f"bundle {info.name} has no config {config!r}; available: {info.configs}")
    base = info.path / "configs" / DEFAULT_CONFIG
    # extra configs (ablations) are layered on top of transfer.json, as MONAI does with a list
    files = [str(base), str(cfg_path)] if cfg_path != base and base.is_file() else [str(cfg_path)]
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
            raise ConfigError(f"unknown config key {key!r} in bundle {info.name}; top-level keys: {top}")
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
            raise user_error from None
        raise
    results_path = Path(workflow.parser.get_parsed_content("output_dir")) / "results.json"
    return json.loads(results_path.read_text()) if results_path.is_file() else {}
