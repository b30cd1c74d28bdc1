"""Apply mutations to a scratch copy of the repository and run the tests each one names."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.mutation.mutations import Mutation

ROOT = Path(__file__).resolve().parents[2]
#: not needed by the tests, or large: left out of the scratch copy
_IGNORE = shutil.ignore_patterns(".git", ".venv", "runs", "site", "__pycache__", "*.pyc", ".pytest_cache")
# the test environment of `make test` (one torch thread, offline hub)
_TEST_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "MEDKT_REQUIRE_MEDCLIP": "1"}


def _pytest(copy: Path, args: Sequence[str], timeout: float) -> tuple[int, str, float]:
    """Run ``pytest -x -q ARGS`` in ``copy`` with ``copy`` first on the path -> (rc, output, seconds)."""
    env = {**os.environ, **_TEST_ENV, "PYTHONPATH": str(copy)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = -1, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    return rc, out, time.perf_counter() - start


def _existing(copy: Path, args: Sequence[str]) -> list[str]:
    """``args`` without test files that do not exist (yet): a mutation whose tests are all missing
    is reported as surviving without running pytest."""
    out: list[str] = []
    for a in args:
        if a.split("::")[0].endswith(".py") and not (copy / a.split("::")[0]).is_file():
            continue
        out.append(a)
    if not any(a.split("::")[0].endswith(".py") for a in out):
        return []
    return out


def _first_failure(output: str) -> str | None:
    m = re.search(r"^(FAILED|ERROR) (\S+)", output, re.M)
    return m.group(2) if m else None


def check_snippets(mutations: Sequence[Mutation], root: Path = ROOT) -> list[str]:
    """Problems with the list: a snippet that is not found exactly once, a no-op replacement."""
    problems = []
    for m in mutations:
        text = (root / m.file).read_text()
        n = text.count(m.original)
        if n != 1:
            problems.append(f"{m.name}: snippet found {n} times in {m.file}")
        if m.original == m.replacement:
            problems.append(f"{m.name}: replacement equals the original")
    return problems


def run(mutations: Sequence[Mutation], timeout: float = 600.0, baseline: bool = True,
        log: Any = print) -> dict[str, Any]:
    """Run every mutation on a scratch copy of the repository; returns the JSON-ready tally.

    Status per mutation: ``caught`` (a listed test failed), ``survived`` (all passed), ``error``
    (pytest could not run them: collection error, no test selected, timeout). With ``baseline``
    the union of the listed tests is run once unmutated first and must pass (else a failing test
    would count as a catch).
    """
    problems = check_snippets(mutations)
    if problems:
        raise SystemExit("stale mutation list:\n  " + "\n  ".join(problems))
    rows = []
    with tempfile.TemporaryDirectory(prefix="medkt-mutation-") as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=_IGNORE)
        if baseline:
            # node ids / files only: a "-k" expression belongs to one mutation
            union = _existing(copy, list(dict.fromkeys(t for m in mutations for t in m.tests if t.endswith(".py") or "::" in t)))
            rc, out, sec = _pytest(copy, union, timeout)
            log(f"baseline: rc {rc} in {sec:.0f} s")
            if rc != 0:
                raise SystemExit("the listed tests fail without any mutation:\n" + out[-3000:])
        for m in mutations:
            path = copy / m.file
            original = path.read_text()
            path.write_text(original.replace(m.original, m.replacement, 1))
            args = _existing(copy, m.tests)
            try:
                rc, out, sec = _pytest(copy, args, timeout) if args else (0, "no test file exists yet", 0.0)
            finally:
                path.write_text(original)
            status = "survived" if rc == 0 else "caught" if rc == 1 else "error"
            row = {"name": m.name, "file": m.file, "what": m.what, "tests": args, "status": status,
                   "failed": _first_failure(out) if status == "caught" else None, "seconds": round(sec, 1)}
            if status == "error":
                row["output_tail"] = out[-1500:]
            rows.append(row)
            log(f"{status:9s} {m.name} ({sec:.0f} s)")
    caught = sum(r["status"] == "caught" for r in rows)
    return {"caught": caught, "total": len(rows), "fraction_caught": round(caught / len(rows), 3) if rows else None,
            "survivors": [r["name"] for r in rows if r["status"] == "survived"],
            "errors": [r["name"] for r in rows if r["status"] == "error"], "mutations": rows}
