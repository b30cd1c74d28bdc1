"""Unlabeled pools of phantoms: a clinic-like stack of scans without labels (issue 20).

`write_pool` draws ``size`` phantoms from the pool seed range (`POOL_SEED_BASE`, disjoint from every
evaluation, validation and training range of `medkt.phantom.experiment`) with a clinic-like mix:
``prevalence`` of the novel finding, ``normal_fraction`` "no finding", the rest spread evenly over
the known findings. It writes them as PNGs in a shuffled order with neutral names
(``images/pool_00000.png``) and a manifest with ONLY a ``path`` column; the truth (file -> finding)
goes to a separate JSON beside the pool folder, read only by the benchmark to count how many
self-training picks truly show the finding. A pool is cached on disk by its parameters: the same
call returns the existing files.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medkt.errors import ConfigError, DataError

#: pool phantoms: make_phantom(finding, POOL_SEED_BASE + pool seed, index); the experiment's ranges
#: are 100_000 + 10 * seed + k (training), 500_000 + seed (validation), 900_000 + seed (evaluation)
POOL_SEED_BASE = 1_300_000
#: pool seeds allowed (keeps the pool range clear of every other range)
MAX_POOL_SEED = 100_000


@dataclass(frozen=True)
class PhantomPool:
    """A written pool: its manifest (``path`` column only), its truth file and its parameters."""

    manifest: Path
    truth: Path
    params: dict

    def labels(self) -> dict[str, str]:
        """Resolved image path -> true finding (from the truth file; the benchmark's eyes only)."""
        d = json.loads(self.truth.read_text())
        root = self.manifest.parent
        return {str((root / rel).resolve()): f for rel, f in d["files"].items()}


def pool_composition(size: int, prevalence: float, novel: str, known: Sequence[str],
                     normal_fraction: float = 0.4) -> dict[str, int]:
    """Finding -> count of a pool of ``size``: ``round(prevalence * size)`` of ``novel``,
    ``round(normal_fraction * size)`` "no finding", the rest as even as possible over the other
    ``known`` findings (the first ones get one more)."""
    if size < 1:
        raise ConfigError(f"pool size = {size}: must be >= 1")
    if not 0.0 <= prevalence <= 1.0 or not 0.0 <= normal_fraction <= 1.0 or prevalence + normal_fraction > 1.0:
        raise ConfigError(f"pool prevalence {prevalence} and normal fraction {normal_fraction} must be in [0, 1] "
                          "and sum to at most 1")
    others = [c for c in known if c not in (novel, "no finding")]
    n_novel = int(round(prevalence * size))
    n_normal = int(round(normal_fraction * size))
    rest = size - n_novel - n_normal
    if rest and not others:
        raise ConfigError(f"a pool of {size} with {n_novel} novel and {n_normal} normal scans needs known findings "
                          "for the remaining ones")
    counts = {"no finding": n_normal} if n_normal else {}
    for k, c in enumerate(others):
        counts[c] = rest // len(others) + (1 if k < rest % len(others) else 0)
    if n_novel:
        counts[novel] = n_novel
    return {c: n for c, n in counts.items() if n}


def pool_key(novel: str, size: int, prevalence: float, known: Sequence[str], seed: int, image_size: int,
             normal_fraction: float) -> str:
    """The pool's folder name: every parameter that changes its images (known findings by a short hash)."""
    import hashlib

    from medkt.phantom.export import slug

    kh = hashlib.sha256("|".join(sorted(known)).encode()).hexdigest()[:8]
    return f"{slug(novel)}_n{size}_p{prevalence:g}_nf{normal_fraction:g}_s{seed}_px{image_size}_k{kh}"


def write_pool(root: str | Path, novel: str, known: Sequence[str], *, size: int = 500, prevalence: float = 0.05,
               seed: int = 0, image_size: int = 64, normal_fraction: float = 0.4) -> PhantomPool:
    """Write (or reuse) the pool of these parameters under ``root`` -> its `PhantomPool`.

    Layout: ``root/<key>/manifest.csv`` (``path`` column only), ``root/<key>/images/pool_NNNNN.png``
    (shuffled order, names carry no label) and ``root/<key>.truth.json`` (outside the pool folder).
    """
    from medkt.phantom.export import write_png
    from medkt.phantom.world import make_phantom
    from medkt.utils import atomic_write_text

    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < MAX_POOL_SEED:
        raise ConfigError(f"pool seed = {seed!r}: must be an integer in [0, {MAX_POOL_SEED})")
    known = list(known)
    counts = pool_composition(size, prevalence, novel, known, normal_fraction)
    params = {"novel": novel, "known": sorted(known), "size": size, "prevalence": prevalence, "seed": seed,
              "image_size": image_size, "normal_fraction": normal_fraction, "counts": counts}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    key = pool_key(novel, size, prevalence, known, seed, image_size, normal_fraction)
    folder, truth = root / key, root / f"{key}.truth.json"
    pool = PhantomPool(folder / "manifest.csv", truth, params)
    if pool.manifest.is_file() and truth.is_file():
        if json.loads(truth.read_text()).get("params") != params:
            raise DataError(f"{truth} was written with other parameters; delete {folder} and {truth} to rebuild it")
        return pool
    items = [(c, i) for c, n in counts.items() for i in range(n)]
    order = np.random.default_rng([POOL_SEED_BASE + seed, 17]).permutation(len(items))
    # built in a private folder and renamed into place: two runs sharing ``root`` (e.g. one per
    # model) never read a half-written pool; the second one to finish keeps the first one's files
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        files: dict[str, str] = {}
        for k, j in enumerate(order):
            c, i = items[j]
            rel = f"images/pool_{k:05d}.png"
            write_png(make_phantom(c, POOL_SEED_BASE + seed, i, image_size).image, tmp / rel)
            files[rel] = c
        # a path column only (no medkt.data.manifest.write_manifest: it always writes a label column)
        (tmp / "manifest.csv").write_text("path\n" + "".join(f"{rel}\n" for rel in files))
        atomic_write_text(truth, json.dumps({"params": params, "files": files}, indent=0))
        if not folder.exists():
            try:
                os.replace(tmp, folder)
            except OSError:  # another run renamed its identical pool into place first
                pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not pool.manifest.is_file():
        raise DataError(f"could not write the pool {folder}; delete it and {truth} and run again")
    return pool


__all__ = ["MAX_POOL_SEED", "POOL_SEED_BASE", "PhantomPool", "pool_composition", "write_pool"]
