"""Peak memory and throughput of streamed zero-shot evaluation (one process per measurement).

``python -m benchmarks.eval_memory --n 300 --workers 0 --json out.json`` writes ``n`` synthetic
224-px PNGs (cached under ``--data``; written before the measurement starts), evaluates them with
:class:`medkt.evaluation.ZeroShotEvaluator` streaming from disk and reports the process's peak RSS
(``VmHWM``; DataLoader workers are separate processes, their ``ru_maxrss`` reported apart) and
images per second. Peak RSS is a per-process high-water mark, so :mod:`benchmarks.run` starts one
process per image count.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path


def write_images(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` random RGB PNGs of ``size``x``size`` (kept between runs)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.png"
        if not p.is_file():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak RSS in MB. For this process: ``VmHWM`` of /proc (the high-water mark of this
    program's memory) — ``ru_maxrss`` survives ``fork`` + ``execve`` on Linux, so a process
    started by a large parent would report the parent's peak."""
    if who == resource.RUSAGE_SELF:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
        except OSError:
            pass
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_memory")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--backend", default="clip:ViT-B-32@random")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", type=Path, default=Path("/tmp/medkt_eval_memory"))
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)

    import torch

    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator

    paths = write_images(a.data / str(a.size), a.n, a.size)
    torch.manual_seed(0)
    backend = create_backend(a.backend)
    classes = {"cat": ["a photo of a cat."], "dog": ["a photo of a dog."], "car": ["a photo of a car."]}
    labels = [list(classes)[i % 3] for i in range(a.n)]
    rss_before = rss_mb()
    ev = ZeroShotEvaluator(backend, paths, labels, classes, batch_size=a.batch_size, num_workers=a.workers)
    t = time.perf_counter()
    res = ev.evaluate()
    dt = time.perf_counter() - t
    out = {"n_images": a.n, "workers": a.workers, "size": a.size, "backend": a.backend, "batch_size": a.batch_size,
           "seconds": dt, "images_per_s": a.n / dt, "peak_rss_mb": rss_mb(),
           "rss_before_evaluation_mb": rss_before, "workers_peak_rss_mb": rss_mb(resource.RUSAGE_CHILDREN),  # ru_maxrss: includes what a worker shared at fork
           "accuracy": res.accuracy, "torch_threads": torch.get_num_threads()}
    text = json.dumps(out)
    if a.json:
        a.json.write_text(text)
    print(text)
    return out


def measure(n: int, workers: int, **kw) -> dict:
    """Run :func:`main` in a fresh process (its own peak-RSS high-water mark)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        args = [sys.executable, "-m", "benchmarks.eval_memory", "--n", str(n), "--workers", str(workers),
                "--json", str(out)] + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


if __name__ == "__main__":
    main()
