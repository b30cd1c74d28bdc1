"""Natural-image experiments of the paper: CLIP on rare concepts, ViLT retrieval/MLM, CoCa captioning.

Modules:

* :mod:`~medkt.natural.classnames` - ImageNet-1k / ImageNet-100 synsets and class names and the
  80 CLIP templates (names and templates from ``open_clip``), the 26 CoCa target-caption
  templates and the 80 COCO categories.
* :mod:`~medkt.natural.datasets` - readers for ImageNet-style folders, Karpathy split JSON and
  COCO captions JSON, plus the manifest preparers.
* :mod:`~medkt.natural.retrieval` - recall@K as ViLT defines it and resumable all-pairs ITM scoring.
* :mod:`~medkt.natural.captioning` - BLEU/METEOR/ROUGE-L/CIDEr(/SPICE) through pycocoevalcap.
* :mod:`~medkt.natural.losses`, :mod:`~medkt.natural.objectives` - ITM and CoCa losses, registered
  with the inversion / fine-tuning engine.
* :mod:`~medkt.natural.mlm` - whole-word masking for (implicit) MLM transfer.
"""
