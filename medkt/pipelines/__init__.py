"""Bundle pipelines: the transfer step (:mod:`medkt.spine`) plus each task's evaluation and report.

* :mod:`~medkt.pipelines.base` - run folders that never lose work, seeds, settings, ``run.log``.
* :mod:`~medkt.pipelines.transfer` - transfer + zero-shot classification on evaluation sets.
* :mod:`~medkt.pipelines.cxr` - chest X-ray sweeps (per-concept learning rates) and evaluation only.
* :mod:`~medkt.pipelines.natural` - CLIP / ViLT / CoCa experiments on natural images.
* the phantom-world demo pipeline lives with the phantom world: :mod:`medkt.phantom.pipeline`;
  the segmentation pipeline with segmentation: :mod:`medkt.segmentation.pipeline`.

Modules are imported by the bundles that use them (``"$import medkt.pipelines.transfer"``).
"""
