"""A finding plugin module for the tests: importing it registers "test speck".

Used as ``--set plugins='["phantom_plugin_example"]'`` (the tests folder is on ``sys.path``).
"""
from __future__ import annotations

import numpy as np

from medkt.phantom import register_finding

NAME = "test speck"


def draw(cv, rng: np.random.Generator):
    cy, cx, side, zone = cv.lung_point(rng, margin=2.0)
    alpha = cv.soft_disk(cy, cx, 1.5, 1.5, edge=0.5)
    cv.image = (cv.image * (1 - alpha) + cv.values["soft"] * 1.2 * alpha).astype(np.float32)
    return alpha > 0.5, {"side": side, "zone": zone}


def describe(attrs: dict, rng: np.random.Generator) -> str:
    return f"a tiny bright speck in the {attrs.get('side', 'right')} lung"


register_finding(NAME, draw, describe, definition="a test speck is a tiny bright speck", overwrite=True)
