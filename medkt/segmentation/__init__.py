"""Zero-shot segmentation (MedCLIP-SAMv2 style): M2IB saliency -> post-processing -> boxes -> SAM -> metrics.

Submodules are imported lazily by their users; importing this package stays cheap.
"""
from __future__ import annotations
