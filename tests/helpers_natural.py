"""Tiny synthetic natural-image datasets in the real on-disk formats (for the natural-image tests).

The writers live in benchmarks/common.py, shared with ``python -m benchmarks.gpu_smoke``.
"""
from benchmarks.common import WORDS, write_coco_captions, write_imagenet, write_karpathy, write_rare_concepts

__all__ = ["WORDS", "write_coco_captions", "write_imagenet", "write_karpathy", "write_rare_concepts"]
