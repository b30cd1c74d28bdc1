"""Zero-shot segmentation of a folder (or a list) of images from a text prompt, scored where masks exist.

For each image: M2IB saliency of the prompt -> k-means + largest component -> box -> SAM ->
mask. Images with a same-named mask in ``--masks`` are scored: Dice (DSC), normalised surface
Dice (NSD, 2 px) and IoU; images without one (unlabelled studies) are segmented and not scored.
Without a SAM checkpoint the post-processed saliency is the prediction (saliency-only, said in
the output).

Offline, on the phantom model shipped with medkt::

    medkt phantom export -o phantoms --findings mass --n 10
    python examples/segment_folder.py --images phantoms/images/mass --masks phantoms/masks/mass
    python examples/segment_folder.py --images phantoms/images/mass/mass_00000.png phantoms/images/mass/mass_00001.png

A real model: ``--backend medclip:vit@/models/medclip-vit --sam /models/sam_vit_b_01ec64.pth
--prompt "a breast ultrasound showing a dark oval lesion with smooth margins"`` (the SAM type is
read from the checkpoint). Writes ``OUT/masks/*.png``, ``OUT/saliency/*.png``,
``OUT/overlays/*.png`` (every image), ``OUT/metrics.csv`` (one row per scored image) and
``OUT/results.json``.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import medkt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="phantom:base", help="model spec family:architecture@weights")
    p.add_argument("--images", required=True, type=Path, nargs="+",
                   help="a folder of images, image files, or a manifest (rows with a mask column are scored)")
    p.add_argument("--masks", type=Path, help="folder of ground-truth masks named like the images (optional)")
    p.add_argument("--prompt", default="a chest x-ray with a large round well-defined dense opacity in the lung")
    p.add_argument("--sam", help="SAM checkpoint: /path/sam_vit_b_01ec64.pth (type read from the file) or "
                                 "vit_b@PATH; tiny@random for tests; default: saliency-only")
    p.add_argument("--layer", type=int, help="encoder layer of the information bottleneck (default: the model's)")
    p.add_argument("--steps", type=int, default=10, help="M2IB optimisation steps per image")
    p.add_argument("--n-images", type=int, help="segment only the first N images")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/segment_folder"))
    args = p.parse_args(argv)

    sam = None
    if args.sam:  # SAM before the backend: a wrong checkpoint fails in a second
        from medkt.segmentation.sam import SamSegmenter

        sam = SamSegmenter.from_spec(args.sam, device=args.device)
    backend = medkt.create_backend(args.backend, device=args.device)
    images = args.images[0] if len(args.images) == 1 else args.images  # a folder, one file or a manifest; a list
    result = medkt.segment(backend, images, args.prompt, masks=args.masks, sam=sam,
                           saliency_config=medkt.M2IBConfig(layer=args.layer, steps=args.steps),
                           max_images=args.n_images, seed=args.seed)
    result.save(args.out)
    summary = result.to_dict()
    print(f"{summary['n_images']} image(s), {summary['n_scored']} scored, mode: {result.mode} -> {args.out}")
    if summary["n_scored"]:
        m = summary["mean"]
        print(f"mean DSC {m['dsc']:.3f}  NSD {m['nsd']:.3f}  IoU {m['iou']:.3f}  ({args.out}/metrics.csv)")
    else:
        print("no ground-truth masks: nothing scored (masks, saliency maps and overlays written)")
    return summary


if __name__ == "__main__":
    main()
