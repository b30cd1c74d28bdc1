"""Peak memory and throughput of streamed zero-shot evaluation (one process per measurement),
and its speed against a plain open_clip loop (`compare_open_clip`, ``--vs-open-clip``).

``python -m benchmarks.eval_memory --n 300 --workers 0 --json out.json`` writes ``n`` synthetic
224-px PNGs (cached under ``--data``; written before the measurement starts), evaluates them with
`medkt.evaluation.ZeroShotEvaluator` streaming from disk and reports the process's peak RSS
(``VmHWM``; DataLoader workers are separate processes, their ``ru_maxrss`` reported apart) and
images per second. Peak RSS is a per-process high-water mark, so `benchmarks.run` starts one
process per image count.

``python -m benchmarks.eval_memory --vs-open-clip --n 256 --size 512 --json out.json`` times
``medkt.evaluate_zero_shot`` against the loop an open_clip user writes (the model's own
``preprocess`` on ``Image.open``, a DataLoader, ``encode_image``) on the same grey PNGs, same
weights, same process; `benchmarks.run` reports the ratio as ``eval_vs_open_clip_ratio``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import peak_rss_mb as rss_mb
from benchmarks.common import write_random_pngs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.eval_memory")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--backend", default="clip:ViT-B-32@random")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--data", type=Path, default=Path("/tmp/medkt_eval_memory"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--vs-open-clip", action="store_true",
                   help="time medkt against a plain open_clip loop instead (grey PNGs; --size 512 for the issue's setting)")
    p.add_argument("--reps", type=int, default=2, help="timed passes per side with --vs-open-clip")
    a = p.parse_args(argv)
    if a.vs_open_clip:
        name = a.backend.split(":", 1)[1].split("@", 1)[0]
        out = compare_open_clip(a.n, a.size, name, a.batch_size, a.reps, a.data)
        text = json.dumps(out, indent=1)
        if a.json:
            a.json.write_text(text)
        print(text)
        return out

    import torch

    from medkt.backends import create_backend
    from medkt.evaluation import ZeroShotEvaluator

    paths = write_random_pngs(a.data / str(a.size), a.n, a.size)
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
    """Run `main` in a fresh process (its own peak-RSS high-water mark)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "r.json"
        args = [sys.executable, "-m", "benchmarks.eval_memory", "--n", str(n), "--workers", str(workers),
                "--json", str(out)] + [x for k, v in kw.items() for x in (f"--{k.replace('_', '-')}", str(v))]
        subprocess.run(args, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())



def compare_open_clip(n: int = 256, size: int = 512, model: str = "ViT-B-32", batch_size: int = 64, reps: int = 2,
                      data: Path = Path("/tmp/medkt_eval_memory")) -> dict[str, Any]:
    """Images per second of ``medkt.evaluate_zero_shot`` and of a plain open_clip loop, same process.

    Both sides classify the same ``n`` random grey ``size``-px PNGs among three one-prompt classes
    with the same random weights, batch size and torch threads, decoding in the main process (0
    DataLoader workers). The open_clip side is the loop its README suggests: its own
    ``preprocess(Image.open(path))`` in a DataLoader, ``encode_image``, normalised embeddings
    against the normalised prompt embeddings; its model is a fresh open_clip model (without medkt's
    instance patches). Passes alternate (open_clip, medkt, open_clip, ...) after one warm-up batch
    each, so load from other processes hits both sides alike. ``ratio`` divides medkt's best rate by
    open_clip's best, each in images per second of this process's CPU time: on a shared machine
    the wall time mostly measures the other processes (``ratio_wall`` has it); with one torch
    thread and no workers the CPU time is what an idle core would take. ``max_abs_score_difference``
    checks that both computed the same scores.

    Args:
        n: images; size: their side in pixels; model: an open_clip model name (medkt's backend
            ``clip:<model>@random``).
        batch_size: images per forward pass (both sides); reps: timed passes per side.
        data: folder where the PNGs are written once and kept.
    """
    import open_clip
    import torch
    import torch.nn.functional as F
    from PIL import Image

    import medkt
    from medkt.backends import create_backend

    paths = write_random_pngs(data / f"grey{size}", n, size, channels=1)
    classes = {"cat": ["a photo of a cat."], "dog": ["a photo of a dog."], "car": ["a photo of a car."]}
    labels = [list(classes)[i % 3] for i in range(n)]
    torch.manual_seed(0)
    backend = create_backend(f"clip:{model}@random").eval()
    plain, _, preprocess = open_clip.create_model_and_transforms(model)
    plain.load_state_dict(backend.model.state_dict())
    plain.eval()
    tokenizer = open_clip.get_tokenizer(model)

    class Files(torch.utils.data.Dataset):
        def __init__(self, files: list[Path]):
            self.files = files

        def __len__(self) -> int:
            return len(self.files)

        def __getitem__(self, i: int) -> torch.Tensor:
            return preprocess(Image.open(self.files[i]))

    def open_clip_scores(files: list[Path]) -> torch.Tensor:
        with torch.no_grad():
            text = F.normalize(plain.encode_text(tokenizer([p[0] for p in classes.values()])), dim=-1)
            rows = [F.normalize(plain.encode_image(x), dim=-1) @ text.t()
                    for x in torch.utils.data.DataLoader(Files(files), batch_size=batch_size, num_workers=0)]
        return torch.cat(rows)

    def medkt_scores(files: list[Path]) -> torch.Tensor:
        res = medkt.evaluate_zero_shot(backend, [str(f) for f in files], classes, labels=labels[: len(files)],
                                       batch_size=batch_size)
        return torch.as_tensor(res.scores)

    sides = {"open_clip": open_clip_scores, "medkt": medkt_scores}
    for fn in sides.values():  # warm-up: allocator, lazy imports, first-call dispatch
        fn(paths[: min(batch_size, n)])
    seconds: dict[str, list[float]] = {k: [] for k in sides}
    cpu_seconds: dict[str, list[float]] = {k: [] for k in sides}
    scores: dict[str, torch.Tensor] = {}
    load = [os.getloadavg()]
    for _ in range(reps):
        for k, fn in sides.items():
            t, c = time.perf_counter(), time.process_time()
            scores[k] = fn(paths)
            seconds[k].append(time.perf_counter() - t)
            cpu_seconds[k].append(time.process_time() - c)
        load.append(os.getloadavg())
    rate = {k: n / min(v) for k, v in seconds.items()}
    cpu_rate = {k: n / min(v) for k, v in cpu_seconds.items()}
    return {"n_images": n, "size": size, "model": model, "batch_size": batch_size, "reps": reps,
            "torch_threads": torch.get_num_threads(), "seconds": seconds, "cpu_seconds": cpu_seconds,
            "images_per_s": rate, "images_per_cpu_s": cpu_rate,
            "ratio": cpu_rate["medkt"] / cpu_rate["open_clip"], "ratio_wall": rate["medkt"] / rate["open_clip"],
            "max_abs_score_difference": float((scores["medkt"].float() - scores["open_clip"].float()).abs().max()),
            "loadavg": load}
