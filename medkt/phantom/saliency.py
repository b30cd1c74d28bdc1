"""Zero-shot segmentation check: M2IB saliency -> binary mask -> Dice against drawn masks.

Reuses the segmentation package (``medkt.segmentation``): the phantom backend exposes a
``vision_split`` so M2IB's token bottleneck runs on its CNN feature map.
"""
from __future__ import annotations

from typing import Any


def saliency_dsc(backend, phantoms, prompt: str, layer: int = 1, method: str = "otsu",
                 n_components: int = 3, beta: float = 0.1, steps: int = 10) -> dict[str, Any]:
    """Mean Dice of saliency masks vs ``phantoms.masks`` (a `PhantomSet`)."""
    import warnings

    from medkt.phantom.metrics import mean_ci
    from medkt.segmentation.m2ib import M2IB, M2IBConfig
    from medkt.segmentation.metrics import segmentation_scores
    from medkt.segmentation.postprocess import postprocess_saliency

    m2ib = M2IB(backend, M2IBConfig(layer=layer, beta=beta, steps=steps))
    x = phantoms.tensor()
    dsc = []
    for i in range(len(x)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sal = m2ib.saliency(x[i], prompt, output_size=tuple(x.shape[-2:]))
            mask = postprocess_saliency(sal, method, n_components=n_components).mask
        dsc.append(segmentation_scores(mask, phantoms.masks[i])["dsc"])
    m, h = mean_ci(dsc)
    return {"dsc": m, "dsc_ci95": h, "per_image": dsc, "method": f"M2IB layer {layer} + {method}, {n_components} components"}
