"""Compare three ways of recognising a new finding on the same images.

1. **name prompts**: zero-shot with "a chest x-ray with <class name>" (no training);
2. **description prompts**: zero-shot with a sentence describing each class (no training);
3. **transfer**: teach the model the finding from its description (inversion + fine-tuning),
   then zero-shot with the name prompts again.

The folder holds one sub-folder per class (PNG, JPEG or DICOM); the class descriptions come from
a JSON file ``{"<sub-folder name>": "<description>", ...}`` (``--descriptions``); the defaults
describe the phantom world. Accuracy alone can be moved by a bias toward the new class; the
AUROC of the finding's score (its images vs the others) cannot, so both are printed.

Offline, on the phantom model shipped with medkt::

    medkt phantom export -o phantoms --findings "no finding,mass,nodule" --n 20
    python examples/compare_prompts.py --images phantoms/images

A real model: ``--backend clip:ViT-B-32@/models/ViT-B-32.pt --descriptions my_classes.json`` (the
transfer settings follow the backend family, ``medkt.recipe_defaults``: the paper's recipe).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import medkt

#: the phantom world's findings (keys: the sub-folder names written by ``medkt phantom export``)
PHANTOM_DESCRIPTIONS = {
    "no_finding": "clear lungs with normal lung markings and a normal heart size",
    "cardiomegaly": "an enlarged heart wider than half of the chest",
    "pleural_effusion": "homogeneous dense fluid at the lung base with a blunted costophrenic angle and a meniscus",
    "edema": "diffuse bilateral hazy opacities spreading from both hila",
    "consolidation": "a patchy ill-defined airspace opacity with air bronchograms",
    "atelectasis": "a thin linear band of opacity in the lower lung",
    "pneumothorax": "a dark lucent space without lung markings along the lung edge with a thin pleural line",
    "mass": "a large round well-defined dense opacity in the lung",
    "nodule": "one to three small round well-defined bright opacities in the lungs, each smaller than 3 cm",
}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", default="phantom:base", help="model spec family:architecture@weights")
    p.add_argument("--images", required=True, type=Path, help="folder with one sub-folder of images per class")
    p.add_argument("--concept", default="nodule", help="the new finding (a sub-folder name)")
    p.add_argument("--descriptions", type=Path, help="JSON: sub-folder name -> description (default: phantom world)")
    p.add_argument("--name-template", default="a chest x-ray with {}")
    p.add_argument("--description-template", default="a chest x-ray showing {}")
    # the settings default to the backend family's recipe (medkt.recipe_defaults): the paper's for a
    # real model, the phantom recipe for phantom:base
    p.add_argument("--n-images", type=int, help="images synthesised for the concept (default: the recipe's)")
    p.add_argument("--steps", type=int, help="inversion steps (default: the recipe's; paper: 5000)")
    p.add_argument("--lr", type=float, help="fine-tuning learning rate (default: the recipe's; paper: 1e-5)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default: the recipe's; paper: 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/compare_prompts"))
    args = p.parse_args(argv)

    descriptions = json.loads(args.descriptions.read_text()) if args.descriptions else PHANTOM_DESCRIPTIONS
    labels = sorted(d.name for d in args.images.iterdir() if d.is_dir())
    missing = [lab for lab in labels if lab not in descriptions]
    if missing or args.concept not in labels:
        p.error(f"need a description for every class and a sub-folder {args.concept!r}: missing {missing}, "
                f"found {labels}")
    name_prompts = {lab: [args.name_template.format(lab.replace("_", " "))] for lab in labels}
    desc_prompts = {lab: [args.description_template.format(descriptions[lab])] for lab in labels}

    backend = medkt.create_backend(args.backend, device=args.device)
    recipe = medkt.recipe_defaults(args.backend)
    print(f"recipe: {recipe.name} (medkt.recipe_defaults({args.backend.split('@')[0]!r}); --steps/--lr/--epochs override)")
    rows = {"name prompts": medkt.evaluate_zero_shot(backend, args.images, name_prompts),
            "description prompts": medkt.evaluate_zero_shot(backend, args.images, desc_prompts)}
    result = medkt.transfer(
        backend,
        [medkt.Concept(args.concept, [descriptions[args.concept]], n_images=args.n_images or recipe.n_images)],
        inversion_config=recipe.inversion_config(steps=args.steps, seed=args.seed),
        finetune_config=recipe.finetune_config(lr=args.lr, epochs=args.epochs, seed=args.seed),
        evaluators={"names": medkt.zero_shot_evaluator(backend, args.images, name_prompts)},
        evaluate_before=False, out_dir=args.out,
    )
    rows["transfer + name prompts"] = result.after["names"]

    others = [c for c in labels if c != args.concept]
    print(f"{'method':<26}{'top-1':>8}{args.concept[:12]:>14}{'others':>8}{'AUROC':>8}")
    table = {}
    for method, r in rows.items():
        table[method] = {"accuracy": r.accuracy, "concept_accuracy": r.per_class.get(args.concept, float("nan")),
                         "other_classes_accuracy": r.mean_accuracy(exclude=[args.concept]),
                         "concept_auroc": r.auroc(args.concept)}
        t = table[method]
        print(f"{method:<26}{100 * t['accuracy']:>7.1f}%{100 * t['concept_accuracy']:>13.1f}%"
              f"{100 * t['other_classes_accuracy']:>7.1f}%{t['concept_auroc']:>8.3f}")
    print(f"(others = mean accuracy of {len(others)} other classes; AUROC of the {args.concept!r} score)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.json").write_text(json.dumps(table, indent=2))
    return table


if __name__ == "__main__":
    main()
