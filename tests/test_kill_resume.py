"""kill -9 at every phase of ``medkt transfer``, then ``--resume``: same bytes as a run never killed.

Each run is a separate process that runs ``medkt transfer --bundle quickstart_tiny`` (the
``medkt.cli.main`` entry point with that argv). It is forked from this test process, which
has already imported torch/MONAI/open_clip, so a run costs its ~2 s of work rather than ~12 s
of imports. ``MEDKT_FAULT_AT`` (:mod:`medkt.faults`) makes the process SIGKILL itself at a
named point, as ``kill -9`` would: nothing is flushed or cleaned up.

Compared with the uninterrupted reference run after the resume:
- ``results.json`` byte-for-byte after dropping timing keys: every key whose name starts with
  ``"seconds"`` at any depth (``seconds_total``, ``seconds_inversion``, ``seconds_finetune``,
  ``seconds_transfer``, ``inversion.seconds`` ...): wall-clock times differ between any two runs;
- every inverted image (``**/images/*.png``) and ``manifest.csv``, and ``finetuned.safetensors``;
- every checkpoint: the killed run's checkpoint files are all still there after the resume, and
  the final set of files equals the reference run's, with equal content (tensors, RNG and
  optimiser state, history; not bytes: ``torch.save`` writes a random serialization id).
"""
from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# a few seconds per run: 2 images per concept, 8 inversion steps checkpointed every 2, 1 fine-tuning step
TINY = ["--set", "inversion#steps=8", "--set", "inversion#checkpoint_every=2",
        "--set", "concepts#0#n_images=2", "--set", "concepts#1#n_images=2",
        "--set", "evaluations#held_out_inversions#n_images=1"]

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def run_forked(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300) -> int:
    """Run ``medkt ARGS`` in a forked child; its stdout/stderr go to ``log``. Returns the exit
    code, or ``-signal`` when the child was killed (``-9`` for SIGKILL)."""
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = open(1, "w", closefd=False)  # pytest's capture objects are not ours
            sys.stderr = open(2, "w", closefd=False)
            import logging

            logging.root.handlers[:] = []  # so the CLI's basicConfig logs to the child's stderr
            os.environ.update(env or {})
            os.chdir(REPO)
            sys.argv = ["medkt", *args]
            from medkt import cli

            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise TimeoutError(f"medkt {' '.join(args)} did not finish in {timeout} s; log: {log}")
        time.sleep(0.05)


def transfer(out: Path, log: Path, *extra: str, fault: str | None = None) -> int:
    env = {"MEDKT_FAULT_AT": fault} if fault else {"MEDKT_FAULT_AT": ""}
    return run_forked(["transfer", "--bundle", "quickstart_tiny", "--output", str(out), *TINY, *extra], log, env)


def without_timings(obj):
    """``results.json`` content without the keys that hold wall-clock times (``seconds*``)."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if not k.startswith("seconds")}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def checkpoints(folder: Path) -> dict[str, object]:
    """Every checkpoint (content) and settings record (text) under ``folder``, by relative path."""
    from medkt.checkpoints import load_checkpoint

    return {str(p.relative_to(folder)): load_checkpoint(p) if p.suffix == ".pt" else p.read_text()
            for p in sorted(folder.rglob("checkpoints/*")) if p.is_file()}


def same(a, b) -> bool:
    """Deep equality of checkpoint contents (tensors bit-exact)."""
    import torch

    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def outputs(folder: Path) -> dict[str, bytes]:
    """The files that must be byte-identical: inverted images, manifests, fine-tuned weights."""
    files = [*folder.rglob("images/*.png"), *folder.rglob("manifest.csv"), folder / "finetuned.safetensors"]
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(files) if p.is_file()}


def warm_imports() -> None:
    """Import here, once, what every run imports lazily, so the forked runs skip it (~20 s each)."""
    import importlib

    for module in ("matplotlib.pyplot", "monai.bundle", "open_clip", "medkt.cli", "medkt.pipelines.transfer"):
        importlib.import_module(module)
    from medkt.backends import create_backend

    create_backend("clip:medkt-tiny-ViT@random")  # loads the backend family's modules


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted run."""
    warm_imports()
    root = tmp_path_factory.mktemp("reference")
    out = root / "run"
    code = transfer(out, root / "log.txt")
    assert code == 0, (root / "log.txt").read_text()[-3000:]
    return out


@pytest.mark.parametrize("fault", [
    "inversion:2",  # the 2nd checkpoint of the first inversion
    "inversion:6",  # a checkpoint of a later inversion (after the held-out set's)
    "after_inversion",  # medkt.spine: inversion saved, fine-tuning not started
    "finetune",  # medkt.spine: fine-tuned, weights not yet saved
    "evaluation",  # medkt.spine: weights saved, evaluation after fine-tuning not done
    "results",  # results.json written, folder not yet renamed
])
def test_kill_then_resume_gives_the_uninterrupted_result(reference, tmp_path, fault):
    out, partial = tmp_path / "run", tmp_path / "run.partial"
    code = transfer(out, tmp_path / "killed.txt", fault=fault)
    assert code == -9, f"not killed at {fault!r} (exit {code}):\n" + (tmp_path / "killed.txt").read_text()[-3000:]
    assert partial.is_dir() and not out.exists()
    kept = checkpoints(partial)
    assert kept, f"nothing checkpointed before the kill at {fault!r}"

    code = transfer(out, tmp_path / "resumed.txt", "--resume")
    assert code == 0, (tmp_path / "resumed.txt").read_text()[-3000:]
    assert out.is_dir() and not partial.exists()

    ref_results = json.loads((reference / "results.json").read_text())
    results = json.loads((out / "results.json").read_text())
    assert json.dumps(without_timings(results)) == json.dumps(without_timings(ref_results))
    ref_files, files = outputs(reference), outputs(out)
    assert "finetuned.safetensors" in ref_files and any(k.endswith(".png") for k in ref_files)
    assert files.keys() == ref_files.keys()
    assert [k for k in files if files[k] != ref_files[k]] == []
    # no checkpoint lost: everything the killed run saved is still there, and the set (and bytes)
    # is the uninterrupted run's
    final, ref_ckpt = checkpoints(out), checkpoints(reference)
    assert set(kept) <= set(final)
    assert final.keys() == ref_ckpt.keys()
    assert [k for k in final if not same(final[k], ref_ckpt[k])] == []
    log = (out / "run.log").read_text()
    assert "medkt resuming" in log and "run finished" in log

