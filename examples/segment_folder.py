"""Zero-shot segmentation of a folder of images from a text prompt, scored against masks.

For each image: M2IB saliency of the prompt -> k-means + largest component -> box -> SAM ->
mask, then Dice (DSC), normalised surface Dice (NSD, 2 px) and IoU against the same-named mask
in ``--masks``. Without a SAM checkpoint the post-processed saliency is the prediction
(saliency-only, said in the output).

Offline, on the phantom model shipped with medkt::

    medkt phantom export -o phantoms --findings mass --n 10
    python examples/segment_folder.py --images phantoms/images/mass --masks phantoms/masks/mass

A real model: ``--backend medclip:vit@/models/medclip-vit --sam vit_b@/models/sam_vit_b_01ec64.pth
--prompt "a breast ultrasound showing a dark oval lesion with smooth margins"``.
Writes ``OUT/masks/*.png``, ``OUT/metrics.csv`` (one row per image) and ``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import medkt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="phantom:base", help="model spec family:architecture@weights")
    p.add_argument("--images", required=True, type=Path, help="folder of images (or a manifest with a mask column)")
    p.add_argument("--masks", type=Path, help="folder of ground-truth masks with the images' file names")
    p.add_argument("--prompt", default="a chest x-ray with a large round well-defined dense opacity in the lung")
    p.add_argument("--sam", help="SAM model: vit_b@/path/sam_vit_b.pth (vit_l, vit_h); tiny@random for tests; "
                                 "default: saliency-only")
    p.add_argument("--layer", type=int, help="encoder layer of the information bottleneck (default: the model's)")
    p.add_argument("--steps", type=int, default=10, help="M2IB optimisation steps per image")
    p.add_argument("--n-images", type=int, help="segment only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/segment_folder"))
    args = p.parse_args(argv)

    backend = medkt.create_backend(args.backend, device=args.device)
    result = medkt.segment(backend, args.images, args.prompt, masks=args.masks, sam=args.sam,
                           saliency_config=medkt.M2IBConfig(layer=args.layer, steps=args.steps),
                           max_images=args.n_images, seed=args.seed)
    result.save_masks(args.out / "masks")
    result.scores.write_csv(args.out / "metrics.csv")
    summary = result.to_dict()
    (args.out / "results.json").write_text(json.dumps(summary, indent=2))
    m = summary["mean"]
    print(f"{summary['n_images']} image(s), mode: {result.mode}")
    print(f"mean DSC {m['dsc']:.3f}  NSD {m['nsd']:.3f}  IoU {m['iou']:.3f}  -> {args.out}/metrics.csv")
    return summary


if __name__ == "__main__":
    main()
