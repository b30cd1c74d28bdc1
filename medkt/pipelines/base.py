"""Base class of bundle pipelines: run folders that never lose work, seeds, settings, ``run.log``.

A bundle's ``configs/transfer.json`` declares ``"pipeline": {"_target_": "medkt.pipelines....",
...}`` and ``"run": ["$@pipeline.run()"]``; MONAI's ``ConfigWorkflow`` (used by both
``medkt transfer`` and ``python -m monai.bundle run``) instantiates and runs it.

Run folder and resume safety (`Pipeline.run`):

1. Everything that can be checked is checked before any folder is touched: the output folder
   (an existing ``output_dir`` is replaced only with ``overwrite=True``), the staging folder
   ``<output_dir>.partial`` (an interrupted run's checkpoints: continuing it needs
   ``resume=True`` / ``--resume``, discarding it ``restart=True`` / ``--restart``; without
   either it is an error that says so), then the subclass's `Pipeline.validate`
   (configs, weights paths, manifests).
2. Everything is written into the staging folder, with a ``run.log`` of what medkt logged
   (timings, versions); the folder is renamed to ``output_dir`` only when the run succeeds.
3. While a process works in the staging folder it holds a lock file there (``.medkt.lock``,
   its pid and host): a second command on the same folder, ``--resume`` and ``--restart``
   included, is refused naming the live pid; the lock of a process that is gone is taken over.
4. After an error of any kind (a user mistake, a bug, Ctrl-C) the staging folder and its
   checkpoints are kept, and the log says how to continue (``--resume``). Only a folder this
   run created that holds nothing but ``run.log`` is removed (nothing to lose).

Under ``python -m monai.bundle run`` the flags are ``--resume true`` and ``--pipeline#restart true``.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import platform
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medkt.distributed import describe_runtime
from medkt.faults import fault_point
from medkt import run_folder
from medkt.run_folder import LOCK_NAME, check_output, check_staging, check_unlocked, folder_lock
from medkt.utils import atomic_write_json, seed_everything

log = logging.getLogger("medkt")

RUN_LOG = "run.log"


def versions() -> dict[str, str]:
    """Versions of python, medkt and the libraries that shape results (installed ones only)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist in ("medkt", "torch", "numpy", "monai", "open_clip_torch", "transformers"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


class Pipeline:
    """Subclasses implement `_run` (write into ``out``; return the results dict) and may
    extend `validate` (checks that need no output folder).

    Args:
        output_dir: the run folder (written as ``<output_dir>.partial`` until the run succeeds).
        seed: seeds python, numpy and torch before `_run`.
        overwrite: replace an existing ``output_dir``.
        resume: continue the interrupted run in ``<output_dir>.partial`` from its checkpoints.
        restart: discard an interrupted run's ``<output_dir>.partial`` and start over.
        progress: progress bars / lines (`medkt.progress`).
        device, precision: where and in which precision the model runs (``"auto"``: see
            `medkt.device`).
        **settings: the subclass's settings, recorded in ``settings.json``.
    """

    #: short name used in reports
    kind = "pipeline"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Pipeline":
        # before any __init__ runs: an unknown keyword (a typo under ``pipeline#``) or a value of
        # the wrong type (``--set seed=abc``) is one ConfigError line, whatever the subclass
        # (a model of the arguments of the __init__ chain: medkt.config_model.check_call)
        from medkt.config_model import check_call

        named = dict(kwargs)
        if args:  # positional ones: matched to the most derived __init__'s parameters
            try:
                bound = inspect.signature(cls.__init__).bind_partial(None, *args)
            except TypeError:
                bound = None  # the real __init__ call reports it
            for name, value in list(bound.arguments.items())[1:] if bound else []:
                named.setdefault(name, value)
        check_call(cls, named, "pipeline", what=cls.__name__)
        return super().__new__(cls)

    def __init__(self, output_dir: str | Path = "runs/latest", seed: int = 0, overwrite: bool = False,
                 resume: bool = False, progress: bool = True, bundle_name: str | None = None,
                 restart: bool = False, device: str = "auto", precision: str = "auto", **settings: Any):
        self.output_dir = Path(output_dir)
        self.seed = int(seed)
        self.overwrite = bool(overwrite)
        self.resume = bool(resume)
        self.restart = bool(restart)
        self.progress = bool(progress)
        self.bundle_name = bundle_name
        self.device = device
        self.precision = precision
        self.settings = settings
        #: `medkt.distributed.runtime_record` of the run (resolved device, precision, GPU, versions)
        self.runtime: dict[str, Any] | None = None

    @property
    def staging_dir(self) -> Path:
        """``<output_dir>.partial``: where the run writes (and keeps its checkpoints) until it succeeds."""
        return run_folder.staging_dir(self.output_dir)

    def check_output(self) -> None:
        """Refuse an existing ``output_dir`` without ``overwrite`` (`medkt.run_folder.check_output`)."""
        check_output(self.output_dir, self.overwrite)

    def check_staging(self) -> None:
        """Refuse to touch an interrupted run's staging folder unless told what to do with it."""
        check_staging(self.output_dir, self.resume, self.restart)

    def validate(self) -> None:
        """Check everything that can be checked without an output folder (configs, weights paths,
        manifests), so a mistake fails in seconds and before any folder or checkpoint is touched.
        Called by `run` after the folder checks; subclasses extend it (call ``super()``)."""

    def preflight(self) -> None:
        """Every check that runs before a folder is touched, in order: output folder, staging
        folder, `validate`. (Under torchrun: run it on rank 0 and share the error, so no
        rank starts work that rank 0 refuses.)"""
        self.check_output()
        self.check_staging()
        self.validate()

    def run(self) -> dict[str, Any]:
        """`preflight`, then run `_run` in the staging folder, write
        ``results.json`` and ``settings.json``, rename the folder to ``output_dir``. Returns the
        results."""
        if os.environ.get("WORLD_SIZE", "1") not in ("", "1") and os.environ.get("RANK", "0") != "0":
            from medkt import distributed as mdist

            if not mdist.is_initialized():  # a pipeline that does not shard its work (see README "Running on GPUs")
                log.warning("%s does not share its work across torchrun ranks: rank 0 runs it alone, rank %s exits",
                            type(self).__name__, os.environ.get("RANK"))
                return {}
        staging = self.staging_dir
        # a live process working in the staging folder comes first: "--resume" or "--restart"
        # would otherwise write into (or delete) the files of a run that is still going
        check_unlocked(staging)
        self.preflight()
        # the device and precision actually used (not "auto"); an unavailable GPU fails here,
        # before any folder is touched
        self.runtime = None
        self._runtime()
        created = not staging.exists()
        staging.mkdir(parents=True, exist_ok=True)
        with folder_lock(staging) as lock:
            if self.restart and not created:
                for p in staging.iterdir():  # everything but the lock just taken
                    if p.name != LOCK_NAME:
                        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                log.info("discarded the interrupted run in %s (--restart)", staging)
            elif self.resume and created:
                log.info("nothing to resume in %s: starting a new run", staging)
            with self._run_log(staging) as run_log:
                seed_everything(self.seed)
                start = time.perf_counter()
                try:
                    results = self._run(staging)
                    results = {"pipeline": self.kind, "bundle": self.bundle_name, "seed": self.seed,
                               "seconds_total": time.perf_counter() - start, "runtime": self.runtime, **results}
                    atomic_write_json(staging / "results.json", results)
                    fault_point("results")  # kill-and-resume tests: die between the results and the rename
                    atomic_write_json(staging / "settings.json", self.describe_settings())
                except BaseException as exc:
                    self._after_error(staging, created or self.restart, exc, run_log)
                    raise
            if self.output_dir.exists():  # overwrite was allowed
                shutil.rmtree(self.output_dir)
            lock.release()  # the lock file must not travel into the finished run folder
            staging.rename(self.output_dir)
        log.info("run folder written: %s", self.output_dir)
        return results

    def _after_error(self, staging: Path, created: bool, exc: BaseException, run_log: logging.Handler) -> None:
        """Keep the staging folder (its checkpoints) and say how to continue; drop it only if
        this run created it and wrote nothing but ``run.log`` into it."""
        if created and all(p.name in (RUN_LOG, LOCK_NAME) or p.is_dir() for p in staging.rglob("*")):
            shutil.rmtree(staging, ignore_errors=True)
            return
        # the error itself into run.log only: the CLI prints it (once) on the console
        run_log.handle(log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s: %s", (type(exc).__name__, exc), None))
        what = "was interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped ({type(exc).__name__})"
        log.error("the run %s; its checkpoints are kept in %s: rerun the same command with --resume to continue "
                  "from them once the problem is fixed, or with --restart to start over", what, staging)

    @contextlib.contextmanager
    def _run_log(self, staging: Path) -> Iterator[logging.Handler]:
        """Copy what the ``medkt`` loggers write into ``<staging>/run.log`` (appended on resume)."""
        logger = logging.getLogger("medkt")
        handler = logging.FileHandler(staging / RUN_LOG, mode="a", encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        handler.setLevel(logging.INFO)
        old_level = logger.level
        if logger.getEffectiveLevel() > logging.INFO:  # run.log gets INFO even when the console does not
            logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        start = time.perf_counter()
        try:
            log.info("medkt %s %s (%s) in %s; command: %s", "resuming" if self.resume else "starting",
                     self.bundle_name or type(self).__name__, self.kind, staging, " ".join(sys.argv))
            log.info("versions: %s; host %s, pid %d, seed %d", json.dumps(versions()), socket.gethostname(),
                     os.getpid(), self.seed)
            log.info("runtime: %s", describe_runtime(self._runtime()))
            yield handler
            log.info("run finished in %.1f s", time.perf_counter() - start)
        finally:
            logger.removeHandler(handler)
            handler.close()
            logger.setLevel(old_level)

    def describe_settings(self) -> dict[str, Any]:
        """The run's ``settings.json``: pipeline class, bundle, seed, device, precision, settings, versions."""
        import torch

        runtime = self._runtime()
        return {
            "pipeline": f"{type(self).__module__}.{type(self).__name__}",
            "bundle": self.bundle_name,
            "seed": self.seed,
            "device": runtime["device"],
            "precision": runtime["precision"],
            "runtime": runtime,
            "settings": json.loads(json.dumps(self.settings, default=str)),
            "versions": versions(),
            "torch_threads": torch.get_num_threads(),
        }

    def _runtime(self) -> dict[str, Any]:
        """The `medkt.distributed.runtime_record` of this run (made once, by `run`)."""
        if self.runtime is None:
            from medkt.distributed import runtime_record

            self.runtime = runtime_record(self.device, self.precision)
        return self.runtime

    def create_backend(self, spec: str, **options: Any):
        """The pipeline's model on its ``device`` (under torchrun: this rank's GPU) in its ``precision``."""
        from medkt import distributed as mdist
        from medkt.backends import create_backend

        return create_backend(spec, device=mdist.local_device(self.device), precision=self.precision, **options)

    def _run(self, out: Path) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
