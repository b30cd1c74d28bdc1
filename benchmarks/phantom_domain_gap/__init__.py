"""Paper §7.3 Q1, domain gap: how far inverted images sit from real ones in the encoder, per layer.

For the shipped phantom model and nodule: feature maps after the stem and every residual block
of (a) real nodule phantoms, (b) normal phantoms (the inversion's start images), (c) images
inverted with the bundle's priors (normal-anatomy start, sparse positive residual, blur/noise
views, 300 steps), (d) images inverted without priors (from uniform noise, pixels, the paper's
affine augmentation, 300 steps), (e) partial-layer inversion of the top 2 blocks (only the layers
after the cut exist). Per layer, every image is summarised by its channel means; we report the
*relative distance* ``||c_X - c_real|| / ||c_normal - c_real||`` of the set centroid ``c_X`` to the
real nodules' (1 = as far as normal scans, 0 = on the real nodules) and the *alignment*
``cos(c_X - c_normal, c_real - c_normal)`` (does the change from normal point toward real nodules?).

    OMP_NUM_THREADS=1 python -m benchmarks.phantom_domain_gap --out benchmarks/phantom_domain_gap/results.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import bundle_config, merge
from benchmarks.phantom_recipes import VARIANTS


def layer_means(backend, x: torch.Tensor) -> list[torch.Tensor]:
    vis = backend.model.visual
    with torch.no_grad():
        return [f.mean((2, 3)) for f in vis.features(backend.normalize(x))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="phantom:base")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from medkt.backends import create_backend
    from medkt.inversion import InversionTarget, invert
    from medkt.partial_inversion import invert_features, split_top
    from medkt.phantom.experiment import TRAIN_SEED_BASE, VAL_SEED_BASE
    from medkt.phantom.world import make_dataset

    cfg = bundle_config("phantom_nodules")
    be = create_backend(args.backend).eval()
    real = make_dataset(["nodule"], 2 * args.n, VAL_SEED_BASE + args.seed).tensor()
    normal = make_dataset(["no finding"], args.n, TRAIN_SEED_BASE + 10 * args.seed + 1).tensor()
    target = [InversionTarget("nodule", cfg["description"], args.n)]
    with_priors = invert(be, target, {**cfg["recipe"]["inversion"], "seed": args.seed}, progress=False,
                         init_images=normal)
    no_priors = invert(be, target, {**merge(cfg["recipe"], VARIANTS["from_noise"])["inversion"], "seed": args.seed},
                       progress=False)
    sp = split_top(be, 2)
    part = invert_features(be, sp, cfg["description"], normal, {"top_blocks": 2, "steps": 200, "seed": args.seed})
    sets = {"normal": layer_means(be, normal), "inverted_with_priors": layer_means(be, with_priors.images),
            "inverted_without_priors": layer_means(be, no_priors.images)}
    c_real = [f.mean(0) for f in layer_means(be, real)]
    # partial: the layers after the cut, computed from the optimised representation
    vis = be.model.visual
    n_layers = len(c_real)
    cut = sp.layer + 1  # index in features(): 0 = stem, k = block k-1
    h = part.features
    b, t, c = h.shape
    g = int(t ** 0.5)
    fmap = h.transpose(1, 2).reshape(b, c, g, g)
    part_means = [None] * n_layers
    with torch.no_grad():
        part_means[cut] = fmap.mean((2, 3))
        for k, blk in enumerate(vis.blocks[sp.layer + 1:]):
            fmap = blk(fmap)
            part_means[cut + 1 + k] = fmap.mean((2, 3))
    sets["partial_top2"] = part_means
    c_norm = [f.mean(0) for f in sets["normal"]]
    out = {"backend": args.backend, "n": args.n, "seed": args.seed, "layers": ["stem"] + [f"block{i}" for i in range(n_layers - 1)],
           "similarity_to_text": {"inverted_with_priors": sum(with_priors.similarities) / args.n,
                                  "inverted_without_priors": sum(no_priors.similarities) / args.n,
                                  "partial_top2": sum(part.similarities) / args.n,
                                  "partial_start": sum(part.start_similarities) / args.n},
           "relative_distance": {}, "alignment": {}}
    for name, feats in sets.items():
        rd, al = [], []
        for L in range(n_layers):
            if feats[L] is None:
                rd.append(None)
                al.append(None)
                continue
            cx = feats[L].mean(0)
            rd.append(float((cx - c_real[L]).norm() / (c_norm[L] - c_real[L]).norm().clamp(min=1e-8)))
            al.append(float(F.cosine_similarity(cx - c_norm[L], c_real[L] - c_norm[L], dim=0)))
        out["relative_distance"][name] = rd
        out["alignment"][name] = al
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("layer        " + "  ".join(f"{n:>10s}" for n in out["layers"]))
    for key in ("relative_distance", "alignment"):
        print(key)
        for name, vals in out[key].items():
            print(f"  {name:24s} " + "  ".join("       -  " if v is None else f"{v:10.3f}" for v in vals))
    print("similarity to the description:", out["similarity_to_text"])

