"""Teach a model a new finding from a text description, then test it on a folder of images.

The model never saw an image of the finding: medkt synthesises images from the description
(inversion), fine-tunes the image encoder on them, and compares zero-shot accuracy on your folder
before and after. The folder holds one sub-folder per class (PNG, JPEG or DICOM files); the
sub-folder names are the class labels and one of them must be the concept's name.

Offline, on the phantom model shipped with medkt::

    medkt phantom export -o phantoms --findings "no finding,mass,nodule" --n 20
    python examples/teach_concept.py --images phantoms/images

A real model: change the spec, e.g. ``--backend medclip:vit@/models/medclip-vit`` (see README,
"Getting weights"), point ``--images`` at your folder and write your own ``--description``; the
steps, learning rate, epochs and image count follow the backend family (``medkt.recipe_defaults``:
the paper's recipe for a real model, the phantom recipe for ``phantom:base``).
Writes ``OUT/inversion/`` (the synthesised images), ``OUT/finetuned.safetensors`` and
``OUT/results.json``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import medkt

NODULE = "one to three small round well-defined bright opacities in the lungs, each smaller than 3 cm"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="phantom:base", help="model spec family:architecture@weights")
    p.add_argument("--images", required=True, type=Path, help="folder with one sub-folder of images per class")
    p.add_argument("--concept", default="nodule", help="name of the new finding (= its sub-folder name)")
    p.add_argument("--description", default=NODULE, help="what the finding looks like, in words")
    p.add_argument("--template", default="a chest x-ray with {}", help="zero-shot prompt of each class")
    # the settings default to the backend family's recipe (medkt.recipe_defaults): the paper's for a
    # real model, the phantom recipe for phantom:base
    p.add_argument("--n-images", type=int, help="images synthesised for the concept (default: the recipe's)")
    p.add_argument("--steps", type=int, help="inversion steps (default: the recipe's; paper: 5000)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the recipe's; paper: 1e-5)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the recipe's; paper: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/teach_concept"), help="output folder")
    args = p.parse_args(argv)

    backend = medkt.create_backend(args.backend, device=args.device)
    recipe = medkt.recipe_defaults(args.backend)
    print(f"recipe: {recipe.name} (medkt.recipe_defaults({args.backend.split('@')[0]!r}); --steps/--lr/--epochs override)")
    labels = sorted(d.name for d in args.images.iterdir() if d.is_dir())
    classes = {lab: [args.template.format(lab.replace("_", " "))] for lab in labels}
    if args.concept not in classes:
        p.error(f"no sub-folder named {args.concept!r} in {args.images} (found {labels})")
    evaluator = medkt.zero_shot_evaluator(backend, args.images, classes)

    result = medkt.transfer(
        backend,
        [medkt.Concept(args.concept, [args.description], n_images=args.n_images or recipe.n_images)],
        inversion_config=recipe.inversion_config(steps=args.steps, seed=args.seed),
        finetune_config=recipe.finetune_config(lr=args.lr, epochs=args.epochs, seed=args.seed),
        evaluators={"images": evaluator},  # the other classes' prompts become the negatives
        out_dir=args.out,
    )

    before, after = result.before["images"], result.after["images"]
    print(f"{'class':<24}{'before':>8}{'after':>8}")
    for c in labels:
        b, a = before.per_class.get(c, float("nan")), after.per_class.get(c, float("nan"))
        print(f"{c:<24}{100 * b:>7.1f}%{100 * a:>7.1f}%")
    print(f"{'top-1':<24}{100 * before.accuracy:>7.1f}%{100 * after.accuracy:>7.1f}%")
    print(f"AUROC of {args.concept!r}: {before.auroc(args.concept):.3f} -> {after.auroc(args.concept):.3f}")
    summary = result.to_dict()
    (args.out / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"wrote {args.out}/results.json")
    return summary


if __name__ == "__main__":
    main()
