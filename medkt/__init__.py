"""medkt: teach vision-language models new visual concepts from text alone.

The algorithm (:mod:`medkt.inversion`, :mod:`medkt.finetune`, :mod:`medkt.evaluation`) talks
only to the backend protocol in :mod:`medkt.backends.base`; model families live in
:mod:`medkt.backends` and are created by name with :func:`medkt.backends.create_backend`.
"""
from __future__ import annotations

__version__ = "0.1.0"
