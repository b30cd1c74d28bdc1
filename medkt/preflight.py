"""Preflight of a bundle run: every check that needs neither torch nor MONAI, all problems at once.

Importing torch and MONAI takes 10-30 s, so a mistake found only after that (a missing manifest,
a weights path with a typo) costs that long per try, and the run stopped at the first one. The
preflight reads the bundle's JSON files itself and, in well under 2 s, reports **every** problem
it finds, each as its own ``error:`` line (exit code 2), before anything is imported or written:

* the JSON files parse (a syntax error names file, line and column) and every ``--set`` key names
  an existing config id (or a new field of an existing section);
* ``device`` has a known form (``auto|cpu|cuda|cuda:N|mps``) and ``precision`` a known value
  (fp16 on an explicit ``cpu`` is refused); whether the GPU exists is decided once torch is loaded;
* the backend's weights: a path after ``@`` exists; no ``@`` means ``$MEDKT_WEIGHTS`` for the
  families whose default it is; an ``org/name`` repo id is in the local Hugging Face cache;
  ``backend_options#tokenizer`` exists. An open_clip pretrained tag (``clip:ViT-B-32@openai``)
  is **not** checked here: telling a tag from a typo needs open_clip's registry (an import of
  several seconds), so it is checked when the model is built;
* every evaluation manifest (and a segmentation ``data#manifest``) exists, has the columns
  ``path,label`` and its image (and mask) files exist, unless the set says ``skip_bad``;
  Karpathy caption files and image folders of the natural-image bundles exist;
* the SAM checkpoint (``sam`` key, else ``$MEDKT_SAM_CHECKPOINT``) is a readable file;
* the run folder: ``--output`` exists without ``--overwrite``, or an interrupted run waits there
  without ``--resume``/``--restart`` (the checks of `medkt.pipelines.base.Pipeline`).

Values are read through MONAI's reference syntax, resolved here on demand: ``"@id"`` is another
entry, ``"$expr"`` a Python expression (evaluated with ``os`` and the already imported ``medkt``
modules; ``@id`` inside it is that entry's value). A value that cannot be worked out this way
(an expression needing a module not imported yet, a ``%`` macro) is skipped: the pipeline still
checks it after MONAI has built it. The pipeline's own `validate`
runs later as before; the preflight only moves the cheap checks ahead and gathers them.

Only the standard library and light medkt modules are imported here (no torch, no MONAI).
"""
from __future__ import annotations

import copy
import os
import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medkt.errors import ConfigError, DataError, MedktError, PreflightError, WeightsNotFoundError, did_you_mean
from medkt.weights import backend_problems

__all__ = ["BundleConfig", "UNKNOWN", "load_config", "override_key_problems", "preflight_bundle",
           "raise_problems"]

#: environment variable of the SAM checkpoint used when a bundle's ``sam`` is null
SAM_CHECKPOINT_ENV = "MEDKT_SAM_CHECKPOINT"
_REF = re.compile(r"@(\w+(?:#\w+)*)")


class _Unknown:
    """A value the preflight cannot work out without MONAI (skipped by every check)."""

    def __repr__(self) -> str:
        return "UNKNOWN"


UNKNOWN = _Unknown()


# -- reading the config ---------------------------------------------------------------------------
def _split_id(ident: str) -> list[str]:
    return ident.replace("::", "#").split("#")


def _set_id(doc: dict, ident: str, value: Any) -> None:
    parts = _split_id(ident)
    cur: Any = doc
    for p in parts[:-1]:
        cur = cur[int(p)] if isinstance(cur, list) else cur.setdefault(p, {})
    if isinstance(cur, list):
        cur[int(parts[-1])] = value
    else:
        cur[parts[-1]] = value


def _has_id(doc: Any, ident: str) -> bool:
    cur = doc
    for p in _split_id(ident):
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            return False
    return True


def load_config(files: list[str]) -> dict[str, Any]:
    """The bundle config of ``files`` merged as MONAI merges a list of config files: later files
    replace top-level entries, ``"+key"`` merges into a dict / extends a list, ``"a#b"`` sets a
    nested entry. A syntax error is a `ConfigError` naming file, line and column."""
    from medkt.config_files import read_json

    merged: dict[str, Any] = {}
    for f in files:
        doc = read_json(f)
        if not isinstance(doc, dict):
            raise ConfigError(f"bundle config {f} must hold a JSON object, got {type(doc).__name__}")
        for k, v in doc.items():
            target = merged.get(k[1:]) if k.startswith("+") else None
            if isinstance(target, dict) and isinstance(v, dict):
                target.update(copy.deepcopy(v))
            elif isinstance(target, list) and isinstance(v, list):
                target.extend(copy.deepcopy(v))
            elif "#" in k or "::" in k:
                _set_id(merged, k, copy.deepcopy(v))
            else:
                merged[k.lstrip("+")] = copy.deepcopy(v)
    return merged


def override_key_problems(config: Mapping[str, Any], overrides: Mapping[str, Any], bundle_name: str,
                          flag: str = "--set") -> list[ConfigError]:
    """One `ConfigError` per override whose key is no config id. A new field inside an
    existing section is allowed (e.g. ``inversion#chunk_size``): the pipeline validates field
    names, so typos there still fail with the known options."""
    from medkt.config_files import _show_override

    out = []
    top = sorted(k for k in config if not k.startswith("_"))
    for key, value in overrides.items():
        parent = key.rpartition("#")[0]
        if _has_id(config, key) or (parent and _has_id(config, parent) and isinstance(_get_raw(config, parent), dict)):
            continue
        shown = _show_override(key, value)
        source = f"from --set {shown}" if flag == "--set" else f"from --{shown.replace('=', ' ', 1)}"
        out.append(ConfigError(f"unknown config key {key!r} in bundle {bundle_name}.{did_you_mean(key.split('#')[0], top)} "
                               f"Top-level keys: {', '.join(top)}", key=key, source=source))
    return out


def _get_raw(doc: Any, ident: str) -> Any:
    cur = doc
    for p in _split_id(ident):
        cur = cur[int(p)] if isinstance(cur, list) else cur[p]
    return cur


class BundleConfig:
    """A merged bundle config whose ``@ref`` / ``$expr`` values are resolved on demand (see the
    module docstring); `get` returns `UNKNOWN` for what cannot be resolved here."""

    def __init__(self, doc: Mapping[str, Any]):
        self.doc = doc
        self._depth = 0

    def get(self, ident: str, default: Any = UNKNOWN) -> Any:
        """The resolved value of config id ``ident`` (``"pipeline#evaluations#jsrt#manifest"``);
        ``default`` when it does not exist; `UNKNOWN` when it cannot be resolved here."""
        self._depth += 1
        try:
            if self._depth > 32:  # a reference cycle: MONAI reports it
                return UNKNOWN
            cur: Any = self.doc
            for p in _split_id(ident):
                cur = self._resolve(cur)
                if isinstance(cur, dict) and p in cur:
                    cur = cur[p]
                elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
                    cur = cur[int(p)]
                elif cur is UNKNOWN:
                    return UNKNOWN
                else:
                    return default
            return self._resolve(cur, deep=True)
        finally:
            self._depth -= 1

    def _resolve(self, value: Any, deep: bool = False) -> Any:
        if isinstance(value, str) and value.startswith("@") and not value.startswith("@@"):
            if value.startswith("@#"):  # relative ids: left to MONAI
                return UNKNOWN
            return self.get(value[1:], default=UNKNOWN)
        if isinstance(value, str) and value.startswith("$"):
            return self._evaluate(value[1:])
        if isinstance(value, str) and value.startswith("%"):  # macros: left to MONAI
            return UNKNOWN
        if deep and isinstance(value, dict):
            return {k: self._resolve(v, deep=True) for k, v in value.items() if k != "_target_"}
        if deep and isinstance(value, list):
            return [self._resolve(v, deep=True) for v in value]
        return value

    def _evaluate(self, expr: str) -> Any:
        if expr.lstrip().startswith("import ") or expr.lstrip().startswith("from "):
            return UNKNOWN
        refs: dict[str, Any] = {}

        def ref(m: re.Match) -> str:
            name = f"__ref{len(refs)}"
            refs[name] = self.get(m.group(1))
            return name

        code = _REF.sub(ref, expr)
        if any(v is UNKNOWN for v in refs.values()):
            return UNKNOWN
        # only what is already loaded: os, and the medkt package (its imported submodules); an
        # expression needing anything else is left to MONAI (UNKNOWN), never imported here
        namespace = {"os": os, "medkt": sys.modules.get("medkt"), "__builtins__": __builtins__, **refs}
        try:
            return eval(code, namespace)  # noqa: S307 - the bundle's own expression, as MONAI evaluates it
        except Exception:
            return UNKNOWN


# -- checks ---------------------------------------------------------------------------------------
def _arg(cfg: BundleConfig, name: str, default: Any = None) -> Any:
    """A pipeline argument: ``pipeline#name`` (following its reference), else the top-level ``name``."""
    if isinstance(cfg.doc.get("pipeline"), dict):
        return cfg.get(f"pipeline#{name}", default=default)
    return cfg.get(name, default=default)


def _arg_id(cfg: BundleConfig, name: str) -> str:
    return f"pipeline#{name}" if isinstance(cfg.doc.get("pipeline"), dict) else name


def _known(*values: Any) -> bool:
    return all(v is not UNKNOWN for v in values)


def _check_device(cfg: BundleConfig) -> list[MedktError]:
    from medkt.device import check_device_spec, check_precision_spec

    out: list[MedktError] = []
    device, precision = _arg(cfg, "device", "auto"), _arg(cfg, "precision", "auto")
    if _known(device):
        try:
            device = check_device_spec(device)
        except ConfigError as exc:
            exc.key = _arg_id(cfg, "device")
            out.append(exc)
            device = None
    if _known(precision):
        try:
            check_precision_spec(precision, device if _known(device) else None)
        except ConfigError as exc:
            exc.key = _arg_id(cfg, "precision")
            out.append(exc)
    return out


def _check_backend(cfg: BundleConfig) -> list[MedktError]:
    spec = _arg(cfg, "backend")
    options = _arg(cfg, "backend_options", {}) or {}
    if not isinstance(spec, str) or not _known(options):
        return []
    return backend_problems(spec, {k: v for k, v in options.items() if _known(v)} if isinstance(options, dict) else {})


def _manifest_problems(what: str, manifest: Any, root: Any, split: Any, skip_bad: Any,
                       need_mask: bool = False) -> list[MedktError]:
    if not _known(manifest, root, split) or not isinstance(manifest, (str, os.PathLike)):
        return []
    manifest = Path(manifest)
    if not manifest.is_file():
        return [DataError(f"{what}: manifest not found: {manifest}; build one with 'medkt data prepare NAME --root "
                          "DIR' or fix the path")]
    try:
        from medkt.data.manifest import read_records  # stdlib only

        rows = read_records(manifest)
    except (DataError, OSError, UnicodeDecodeError) as exc:
        return [DataError(f"{what}: {exc}")]
    # one stat per file, no path resolution: read_manifest's full checks (paths escaping the root,
    # labels) cost ~0.5 ms a row, 25 s for ImageNet's 50,000; the pipeline runs them later anyway
    base = os.fspath(root or manifest.parent)
    missing: list[str] = []
    no_mask: list[int] = []
    first = 1 if manifest.suffix == ".jsonl" else 2
    for i, rec in enumerate(rows, start=first):
        if split is not None and rec.get("split") != split:
            continue
        path, mask = rec.get("path"), rec.get("mask")
        if not path or not os.path.isfile(os.path.join(base, path)):
            missing.append(f"{manifest}:{i}: file not found: {os.path.join(base, path or '')}")
        if mask and not os.path.isfile(os.path.join(base, mask)):
            missing.append(f"{manifest}:{i}: mask not found: {os.path.join(base, mask)}")
        elif need_mask and not mask:
            no_mask.append(i)
    out: list[MedktError] = []
    if missing and skip_bad is not True:
        out.append(DataError(f"{what}: {len(missing)} file(s) listed in {manifest} are missing, e.g. {missing[0]}; "
                             "fix the paths or the root (or set skip_bad to skip such rows)"))
    if no_mask:
        out.append(DataError(f"{what}: {len(no_mask)} row(s) of {manifest} have no mask (e.g. {manifest}:{no_mask[0]}); "
                             "a segmentation manifest needs the column mask"))
    return out


def _check_data(cfg: BundleConfig) -> list[MedktError]:
    out: list[MedktError] = []
    evaluations = _arg(cfg, "evaluations", {})
    # --skip-unreadable (pipeline#skip_unreadable, or per evaluation set) skips missing files as well
    skip_all = _arg(cfg, "skip_unreadable", False) is True
    if isinstance(evaluations, dict):
        for name, spec in evaluations.items():
            if not isinstance(spec, dict) or spec.get("source") == "inversion":
                continue
            skip = spec.get("skip_bad", False) is True or spec.get("skip_unreadable", False) is True or skip_all
            out += _manifest_problems(f"evaluation {name!r}", spec.get("manifest", UNKNOWN), spec.get("root"),
                                      spec.get("split"), skip)
    data = _arg(cfg, "data")
    if isinstance(data, dict):
        if "manifest" in data:
            out += _manifest_problems("data", data["manifest"], data.get("root"), data.get("split"),
                                      data.get("skip_bad", False), need_mask=True)
        for key in ("images", "masks"):
            folder = data.get(key)
            if isinstance(folder, str) and not Path(folder).is_dir():
                out.append(DataError(f"data#{key}: folder not found: {folder}; fix the path"))
    for key, kind in (("karpathy_json", "file"), ("image_root", "folder")):
        value = _arg(cfg, key)
        if isinstance(value, str) and not (Path(value).is_file() if kind == "file" else Path(value).is_dir()):
            out.append(DataError(f"{key}: {kind} not found: {value}; see the bundle's docs/README.md for where the "
                                 "dataset goes (or fix the path)"))
    pool = _arg(cfg, "unlabeled")
    pool = pool.get("path") if isinstance(pool, dict) else pool
    if isinstance(pool, str) and not Path(pool).exists():
        out.append(DataError(f"unlabeled: pool not found: {pool}; give a folder of images or a manifest with a "
                             "path column (or fix the path)"))
    images = _arg(cfg, "images")
    if isinstance(images, str) and images not in ("inversion", "noise") and not Path(images).exists():
        out.append(ConfigError(f"images must be 'inversion', 'noise', an inversion manifest.csv or a run folder "
                               f"holding inversion/manifest.csv files; got {images!r}", key=_arg_id(cfg, "images")))
    return out


def _check_sam(cfg: BundleConfig) -> list[MedktError]:
    if not (isinstance(cfg.doc.get("pipeline"), dict) and "sam" in cfg.doc["pipeline"]):
        return []
    sam = _arg(cfg, "sam")
    if sam is UNKNOWN:
        return []
    if not sam and not os.environ.get(SAM_CHECKPOINT_ENV, ""):
        return []  # saliency-only mode
    # segmentation's own cheap check (no torch; numpy only, so imported here, for SAM bundles alone)
    from medkt.segmentation.sam import check_sam_checkpoint

    where = "sam" if sam else SAM_CHECKPOINT_ENV
    return [WeightsNotFoundError(f"{where}: {msg}") for msg in check_sam_checkpoint(str(sam) if sam else None)]


def _check_output(output: str | Path | None, overwrite: bool, resume: bool, restart: bool) -> list[MedktError]:
    if output is None or os.environ.get("RANK", "0") != "0":
        return []  # under torchrun rank 0 checks the folders (ranks > 0 could see rank 0's new folder)
    from medkt.run_folder import run_folder_problems

    return run_folder_problems(output, overwrite, resume, restart)


CHECKS: tuple[Callable[[BundleConfig], list[MedktError]], ...] = (_check_device, _check_backend, _check_data, _check_sam)


def preflight_bundle(files: list[str], overrides: Mapping[str, Any] | None = None, *, bundle_name: str = "",
                     output: str | Path | None = None, overwrite: bool = False, resume: bool = False,
                     restart: bool = False, flag: str = "--set") -> list[MedktError]:
    """Every problem of a bundle run that can be found without torch and MONAI (see the module
    docstring), each with the file or override it came from; an empty list when none.

    Args:
        files: the config files, as MONAI gets them (``transfer.json`` first, an ablation after it).
        overrides: ``--set`` values (MONAI ids -> values).
        bundle_name: for messages.
        output, overwrite, resume, restart: the run folder and its flags (None: not checked).
        flag: how overrides were given (``"--set"`` for ``medkt``, ``"--"`` for ``monai.bundle run``).
    """
    from medkt.config_files import attach_source

    overrides = dict(overrides or {})
    try:
        config = load_config(files)
    except ConfigError as exc:  # nothing else can be read
        return [exc]
    problems: list[MedktError] = list(override_key_problems(config, overrides, bundle_name or "?", flag))
    bad = {p.key for p in problems if isinstance(p, ConfigError)}
    for key, value in overrides.items():
        if key not in bad:
            _set_id(config, key, value)
    cfg = BundleConfig(config)
    for check in CHECKS:
        problems += check(cfg)
    problems += _check_output(output, overwrite, resume, restart)
    for p in problems:
        if isinstance(p, MedktError):
            attach_source(p, files, overrides, flag)
    return problems


def raise_problems(problems: list[MedktError]) -> None:
    """Nothing for no problem; the problem itself for one (its type kept); a
    `PreflightError` listing them for several."""
    if len(problems) == 1:
        raise problems[0]
    if problems:
        raise PreflightError(problems)
