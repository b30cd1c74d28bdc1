"""Base class of bundle pipelines: atomic run folders, seeds, settings and ``results.json``.

A bundle's ``configs/transfer.json`` declares ``"pipeline": {"_target_": "medkt.pipelines....",
...}`` and ``"run": ["$@pipeline.run()"]``; MONAI's ``ConfigWorkflow`` (used by both
``medkt transfer`` and ``python -m monai.bundle run``) instantiates and runs it.

Output safety: everything is written into ``<output_dir>.partial`` and renamed to
``output_dir`` only when the run succeeds. A user error (:class:`~medkt.errors.MedktError`)
removes the staging folder, so nothing half-written is left; any other interruption keeps it so
``resume=True`` can continue from its checkpoints. An existing ``output_dir`` is never replaced
unless ``overwrite=True``.
"""
from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from medkt.errors import MedktError, OutputExistsError
from medkt.utils import atomic_write_json, seed_everything

log = logging.getLogger("medkt")


class Pipeline:
    """Subclasses implement :meth:`_run` (write into ``out``; return the results dict)."""

    #: short name used in reports
    kind = "pipeline"

    def __init__(self, output_dir: str | Path = "runs/latest", seed: int = 0, overwrite: bool = False,
                 resume: bool = False, progress: bool = True, bundle_name: str | None = None, **settings: Any):
        self.output_dir = Path(output_dir)
        self.seed = int(seed)
        self.overwrite = bool(overwrite)
        self.resume = bool(resume)
        self.progress = bool(progress)
        self.bundle_name = bundle_name
        self.settings = settings

    @property
    def staging_dir(self) -> Path:
        return self.output_dir.with_name(self.output_dir.name + ".partial")

    def check_output(self) -> None:
        if self.output_dir.exists() and not self.overwrite:
            raise OutputExistsError(
                f"output folder {self.output_dir} already exists; choose another --output or pass --overwrite"
            )

    def run(self) -> dict[str, Any]:
        self.check_output()
        staging = self.staging_dir
        if staging.exists() and not self.resume:
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        seed_everything(self.seed)
        start = time.perf_counter()
        try:
            results = self._run(staging)
        except MedktError:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        except BaseException:
            log.error("run interrupted; partial outputs kept in %s (rerun with --resume to continue)", staging)
            raise
        results = {"pipeline": self.kind, "bundle": self.bundle_name, "seed": self.seed,
                   "seconds_total": time.perf_counter() - start, **results}
        atomic_write_json(staging / "results.json", results)
        atomic_write_json(staging / "settings.json", self.describe_settings())
        if self.output_dir.exists():  # overwrite was allowed
            shutil.rmtree(self.output_dir)
        staging.rename(self.output_dir)
        log.info("run folder written: %s", self.output_dir)
        return results

    def describe_settings(self) -> dict[str, Any]:
        import torch

        from medkt import __version__

        return {
            "pipeline": f"{type(self).__module__}.{type(self).__name__}",
            "bundle": self.bundle_name,
            "seed": self.seed,
            "settings": json.loads(json.dumps(self.settings, default=str)),
            "versions": {"medkt": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "torch_threads": torch.get_num_threads(),
        }

    def _run(self, out: Path) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
