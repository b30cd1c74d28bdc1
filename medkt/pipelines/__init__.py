"""Bundle pipelines: the transfer step (`medkt.spine`) plus each task's evaluation and report.

* `base` - run folders that never lose work, seeds, settings, ``run.log``.
* `transfer` - transfer + zero-shot classification on evaluation sets.
* `cxr` - chest X-ray sweeps (per-concept learning rates) and evaluation only.
* `natural` - CLIP / ViLT / CoCa experiments on natural images.
* the phantom-world demo pipeline lives with the phantom world: `medkt.phantom.pipeline`;
  the segmentation pipeline with segmentation: `medkt.segmentation.pipeline`.

Modules are imported by the bundles that use them (``"$import medkt.pipelines.transfer"``).
"""
