"""Natural-image experiments of the paper: CLIP on rare concepts, ViLT retrieval/MLM, CoCa captioning.

Modules:

* `classnames` - ImageNet-1k / ImageNet-100 synsets and class names and the
  80 CLIP templates (names and templates from ``open_clip``), the 26 CoCa target-caption
  templates and the 80 COCO categories.
* `datasets` - readers for ImageNet-style folders, Karpathy split JSON and
  COCO captions JSON, plus the manifest preparers.
* `retrieval` - recall@K as ViLT defines it and resumable all-pairs ITM scoring.
* `captioning` - BLEU/METEOR/ROUGE-L/CIDEr(/SPICE) through pycocoevalcap.
* `losses`, `objectives` - ITM and CoCa losses, registered
  with the inversion / fine-tuning engine.
* `mlm` - whole-word masking for (implicit) MLM transfer.
"""
