"""Time-to-error of ``medkt transfer --bundle`` for every shipped bundle and config (issue 18, item 8).

    python -m benchmarks.preflight_timing [--repeat 3] [--json benchmarks/preflight_timing/results.json]

Each run is a fresh ``python -m medkt transfer --bundle NAME --config FILE -o NEW`` with one
deliberate bad value (``--set device=not-a-device``), so every bundle stops at the preflight; the
wall time therefore covers interpreter start, the CLI import and the whole preflight (JSON, keys,
device, weights, manifests, SAM, run folder); ``preflight_only_seconds`` is the preflight alone. Where the datasets and weights are absent (as on a
fresh checkout) the preflight reports those problems too, which is the case a user meets first.
It also asserts that neither torch nor MONAI was imported (``-X importtime``). Medians of
``--repeat`` runs; the machine's load average is recorded beside them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def time_bundle(name: str, config: str, repeat: int, workdir: Path) -> dict:
    """Median wall time of ``repeat`` CLI runs that stop at the preflight, and their error count."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-X", "importtime", "-m", "medkt", "transfer", "--bundle", name, "--config", config,
           "-o", str(workdir / f"{name}-{config}"), "--set", "device=not-a-device"]
    times, errors, heavy = [], 0, set()
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env, timeout=120)
        times.append(time.perf_counter() - t0)
        if r.returncode != 2:
            raise RuntimeError(f"{name}/{config}: expected exit code 2, got {r.returncode}: {r.stderr[-500:]}")
        errors = sum(ln.startswith("error:") for ln in r.stderr.splitlines())
        heavy |= {ln.rsplit("|", 1)[-1].strip().split(".")[0] for ln in r.stderr.splitlines()
                  if ln.startswith("import time:")} & {"torch", "monai"}
    return {"bundle": name, "config": config, "seconds_median": statistics.median(times),
            "seconds_max": max(times), "error_lines": errors, "imported_torch_or_monai": sorted(heavy),
            "preflight_only_seconds": preflight_only(name, config, workdir)}


def preflight_only(name: str, config: str, workdir: Path) -> float:
    """Seconds of `medkt.preflight.preflight_bundle` alone, in this (warm) process."""
    from medkt.bundles import find_bundle
    from medkt.preflight import preflight_bundle

    info = find_bundle(name)
    files = [str(info.path / "configs" / "transfer.json")]
    if config != "transfer.json":
        files.append(str(info.path / "configs" / config))
    cwd = os.getcwd()
    os.chdir(workdir)  # relative data paths as in the CLI runs
    try:
        t0 = time.perf_counter()
        preflight_bundle(files, {"device": "not-a-device"}, bundle_name=name, output=workdir / "x")
        return time.perf_counter() - t0
    finally:
        os.chdir(cwd)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    from medkt.bundles import list_bundles

    rows = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        for b in list_bundles():
            for config in b.configs:
                row = time_bundle(b.name, config, args.repeat, Path(tmp))
                rows.append(row)
                print(f"{b.name:32s} {config:40s} {row['seconds_median']:5.2f} s (max {row['seconds_max']:.2f}), "
                      f"preflight alone {row['preflight_only_seconds']:.3f} s, {row['error_lines']} error line(s){'  IMPORTED ' + str(row['imported_torch_or_monai']) if row['imported_torch_or_monai'] else ''}")
    out = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "load_before": load_before,
           "load_after": os.getloadavg(), "repeat": args.repeat, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if all(r["seconds_median"] < 2.0 and not r["imported_torch_or_monai"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
