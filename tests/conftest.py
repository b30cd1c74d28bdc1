"""Shared test setup: one torch thread, offline hub, tiny random backends."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import NamedTuple  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# on a shared 2-core machine two threads made tiny models 100-300x slower
torch.set_num_threads(1)


@pytest.fixture
def tiny_clip():
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend("clip:medkt-tiny-ViT@random")


@pytest.fixture
def tiny_hf_clip():
    from medkt.backends import create_backend

    return create_backend("hf_clip:tiny@random")


@pytest.fixture(params=["clip:medkt-tiny-ViT@random", "hf_clip:tiny@random"])
def tiny_backend(request):
    from medkt.backends import create_backend

    torch.manual_seed(0)
    return create_backend(request.param)


def run_medkt_in_process(monkeypatch, capsys, *args: str):
    """Run ``medkt ARGS`` through ``medkt.cli.main`` in this process (fast; no interpreter start).

    Returns ``(exit code, capsys.readouterr())``. An exception that ``--debug`` lets through is
    printed as a traceback to stderr and gives exit code 1, as the real command would.
    """
    import logging
    import traceback

    from medkt import cli

    root = logging.getLogger()
    handlers = list(root.handlers)
    # a bundle's logging.conf (and MONAI's own loggers) bind handlers to the sys.stdout of the
    # test that created them, which pytest has closed since: point those at the live stream
    for lg in [root, *(v for v in logging.root.manager.loggerDict.values() if isinstance(v, logging.Logger))]:
        for h in lg.handlers:
            stream = getattr(h, "stream", None)
            if stream is not None and getattr(stream, "closed", False):
                h.stream = sys.stdout  # setStream would flush the closed one
    monkeypatch.setattr(sys, "argv", ["medkt", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:  # --debug re-raises user errors
        traceback.print_exc()
        code = 1
    finally:
        root.handlers[:] = handlers  # drop handlers bound to this test's captured stdout
    return code, capsys.readouterr()


class MedktRun(NamedTuple):
    """What ``medkt ARGS`` did: like ``subprocess.CompletedProcess`` and unpackable."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def medkt(capsys, monkeypatch):
    """``medkt ARGS`` in-process from the repository root (fast) -> :class:`MedktRun`."""
    repo = Path(__file__).resolve().parent.parent

    def run(*args: str) -> MedktRun:
        monkeypatch.chdir(repo)
        code, io = run_medkt_in_process(monkeypatch, capsys, *args)
        return MedktRun(code, io.out, io.err)

    return run
