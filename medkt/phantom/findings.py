"""Built-in findings of the phantom world (plugins registered at import).

Each finding draws onto the `Canvas` and returns ``(mask,
attributes)``; its describer turns the attributes into a varied description that never names
the finding. Vocabulary is deliberately shared between findings (size: small/large; shape:
round/patchy/linear; margin: well-defined/ill-defined; brightness: dense/bright/lucent; count:
single/two/multiple; location: right/left, upper/middle/lower) so that a new finding, such as
the held-out *nodule*, can be described entirely with words the model already grounds.
"""
from __future__ import annotations

import math
import numpy as np
from scipy import ndimage

from medkt.phantom.world import Canvas, register_finding

NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}


# ----------------------------------------------------------------------------------------------
# description helpers
# ----------------------------------------------------------------------------------------------
def pick(rng: np.random.Generator, options: list[str]) -> str:
    """One of ``options``, drawn with ``rng``."""
    return options[int(rng.integers(len(options)))]


def location_phrase(side: str, zone: str | None, rng: np.random.Generator) -> str:
    """``("right", "upper")`` -> e.g. "in the right upper lung" / "in the right upper zone"."""
    if side == "bilateral":
        return pick(rng, ["in both lungs", "bilaterally", "in both lung fields"])
    if zone is None:
        return pick(rng, [f"in the {side} lung", f"on the {side} side", f"in the {side} hemithorax"])
    return pick(rng, [f"in the {side} {zone} lung", f"in the {side} {zone} zone", f"in the {zone} {side} lung",
                      f"in the {zone} zone of the {side} lung"])


def join_phrases(main: str, extras: list[str], rng: np.random.Generator, k_max: int = 2) -> str:
    """Main phrase + up to ``k_max`` random extra clauses."""
    k = int(rng.integers(0, min(k_max, len(extras)) + 1))
    chosen = list(rng.choice(extras, size=k, replace=False)) if k else []
    if not chosen:
        return main
    if len(chosen) == 1:
        return f"{main} {pick(rng, ['with', 'and'])} {chosen[0]}"
    return f"{main} with {', '.join(chosen[:-1])} and {chosen[-1]}"


def _blend(cv: Canvas, alpha: np.ndarray, value: float | np.ndarray) -> None:
    cv.image = (cv.image * (1 - alpha) + value * alpha).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# no finding
# ----------------------------------------------------------------------------------------------
def draw_no_finding(cv: Canvas, rng: np.random.Generator):
    """Normal anatomy: nothing drawn (an empty mask, no attributes)."""
    return np.zeros((cv.size, cv.size), bool), {}


def describe_no_finding(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a normal chest (phrasing drawn with ``rng``)."""
    parts = ["clear lungs", "normal heart size", "no focal opacity", "sharp costophrenic angles",
             "normal lung markings", "no pleural fluid", "a normal cardiac silhouette", "well expanded lungs",
             "no lesion"]
    k = int(rng.integers(1, 4))
    chosen = list(rng.choice(parts, size=k, replace=False))
    return chosen[0] if k == 1 else ", ".join(chosen[:-1]) + " and " + chosen[-1]


# ----------------------------------------------------------------------------------------------
# cardiomegaly
# ----------------------------------------------------------------------------------------------
def draw_cardiomegaly(cv: Canvas, rng: np.random.Generator):
    """Draw cardiomegaly onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    cy, cx, ry, rx = cv.heart
    f = float(rng.uniform(1.3, 1.65))
    nrx, nry = rx * f, ry * (1 + 0.5 * (f - 1))
    ncy, ncx = cy + 0.3 * (nry - ry), cx + 0.25 * (nrx - rx)
    alpha = cv.soft_disk(ncy, ncx, nry, nrx, rng.normal(0, 5), edge=1.0)
    _blend(cv, alpha, cv.values["soft"] * 1.12)
    ctr = 2 * nrx / cv.thorax_width
    return alpha > 0.5, {"severity": "marked" if f > 1.48 else "mild", "ctr": round(ctr, 2)}


def describe_cardiomegaly(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn cardiomegaly from its attributes (phrasing drawn with ``rng``)."""
    sev = attrs.get("severity", "mild")
    main = pick(rng, [f"{'a markedly' if sev == 'marked' else 'a mildly'} enlarged heart",
                      "an enlarged cardiac silhouette", "a wide heart shadow",
                      f"{sev} enlargement of the heart", "a large globular heart"])
    extras = ["a cardiothoracic ratio above one half", "a broad mediastinal contour",
              "the heart filling more than half of the chest width", "clear lungs"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# pleural effusion
# ----------------------------------------------------------------------------------------------
def draw_pleural_effusion(cv: Canvas, rng: np.random.Generator):
    """Draw pleural effusion onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    u = rng.random()
    sides = ["right"] if u < 0.4 else (["left"] if u < 0.8 else ["right", "left"])
    size = pick(rng, ["small", "moderate", "large"])
    frac = {"small": (0.14, 0.22), "moderate": (0.26, 0.36), "large": (0.4, 0.52)}[size]
    mask = np.zeros((cv.size, cv.size), bool)
    for side in sides:
        y0, y1, x0, x1 = cv.lung_boxes[side]
        h = (y1 - y0) * rng.uniform(*frac)
        lateral = (cv.xx - x1) / (x0 - x1) if side == "right" else (cv.xx - x0) / (x1 - x0)
        lateral = np.clip(lateral, 0, 1)  # 1 at the lateral chest wall
        level = y1 - h * (1 + 0.6 * lateral**2)  # meniscus climbs laterally
        region = cv.lungs[side] & (cv.yy > level)
        # fill down to the costophrenic recess too (below the dome, inside the body)
        alpha = ndimage.gaussian_filter(region.astype(np.float32), 0.6 * cv.scale)
        _blend(cv, np.clip(alpha * 1.3, 0, 1), cv.values["soft"] * rng.uniform(1.0, 1.1))
        mask |= alpha > 0.5
    side_word = "bilateral" if len(sides) == 2 else sides[0]
    return mask, {"side": side_word, "size": size}


def describe_pleural_effusion(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn pleural effusion from its attributes (phrasing drawn with ``rng``)."""
    size, side = attrs.get("size", "moderate"), attrs.get("side", "right")
    where = "at both lung bases" if side == "bilateral" else pick(rng, [f"at the {side} lung base", f"at the {side} base",
                                                                        f"in the {side} lower chest"])
    main = pick(rng, [f"a {size} fluid collection {where}", f"{size} homogeneous dense opacity {where}",
                      f"a {size} layering fluid density {where}"])
    extras = ["a blunted costophrenic angle", "a concave meniscus", "an obscured diaphragm", "a fluid level curving up laterally"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# edema
# ----------------------------------------------------------------------------------------------
def draw_edema(cv: Canvas, rng: np.random.Generator):
    """Draw edema onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    sev = pick(rng, ["mild", "moderate", "severe"])
    amp = {"mild": 0.14, "moderate": 0.2, "severe": 0.27}[sev] * rng.uniform(0.9, 1.1)
    cy, cx, _, _ = cv.heart
    haze = np.zeros_like(cv.image)
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        x0, x1 = cv.lung_boxes[side][2:]
        hx = (x0 + x1) / 2 - sgn * 2.5
        hy = cy - rng.uniform(6, 9)
        haze += np.exp(-(((cv.xx - hx) / 7.5) ** 2 + ((cv.yy - hy) / 11.0) ** 2) / 2)
    haze *= 0.75 + 0.5 * np.clip(0.5 + 0.25 * cv.smooth_noise(rng, 2.0), 0, 1)
    lungs = cv.lung_union
    field = np.clip(haze, 0, 1.2) * lungs
    # interstitial (Kerley B) lines: short horizontal lines at the lower lateral periphery
    lines = np.zeros_like(cv.image)
    for side in ("right", "left"):
        y0, y1, x0, x1 = cv.lung_boxes[side]
        for _ in range(int(rng.integers(3, 6))):
            ly = rng.uniform(y0 + 0.55 * (y1 - y0), y1 - 1.5)
            lx = x0 + rng.uniform(0.5, 3.0) if side == "right" else x1 - rng.uniform(0.5, 3.0)
            lines += cv.soft_disk(ly, lx, 0.45, 2.2, 0, edge=0.5)
    lines *= lungs
    cv.image = (cv.image + amp * field + 0.12 * np.clip(lines, 0, 1)).astype(np.float32)
    cv.image = np.where(lungs, ndimage.gaussian_filter(cv.image, 0.5 * cv.scale), cv.image).astype(np.float32)
    return (field > 0.45) & lungs, {"severity": sev, "side": "bilateral"}


def describe_edema(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn edema from its attributes (phrasing drawn with ``rng``)."""
    sev = attrs.get("severity", "moderate")
    main = pick(rng, [f"{sev} diffuse bilateral hazy opacities", f"{sev} perihilar haziness in both lungs",
                      f"bilateral {sev} hazy density spreading from both hila", f"{sev} symmetric fluffy shadowing in both lungs"])
    extras = ["thin interstitial lines at the lung bases", "a bat wing pattern", "indistinct vessels",
              "peribronchial cuffing"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# consolidation
# ----------------------------------------------------------------------------------------------
def draw_consolidation(cv: Canvas, rng: np.random.Generator):
    """Draw consolidation onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    count = 1 if rng.random() < 0.8 else 2
    size = pick(rng, ["small", "large"])
    mask = np.zeros((cv.size, cv.size), bool)
    side0 = "right" if rng.random() < 0.5 else "left"
    zones = []
    for k in range(count):
        r = rng.uniform(3.5, 5.0) if size == "small" else rng.uniform(6.0, 8.5)
        cy, cx, side, zone = cv.lung_point(rng, side=side0, margin=r * 0.5)
        zones.append(zone)
        blob = np.zeros_like(cv.image)
        for _ in range(int(rng.integers(3, 6))):  # irregular: union of offset blobs
            oy, ox = rng.normal(0, r * 0.45, 2)
            br = r * rng.uniform(0.45, 0.8)
            blob = np.maximum(blob, cv.soft_disk(cy + oy, cx + ox, br * rng.uniform(0.7, 1.3), br, rng.uniform(0, 180), edge=2.0))
        blob = ndimage.gaussian_filter(blob, rng.uniform(1.0, 1.6) * cv.scale) * cv.lungs[side]
        alpha = np.clip(blob * rng.uniform(1.1, 1.4), 0, 1) * 0.85
        # air bronchograms: dark branching tubes inside the opacity
        bron = np.zeros_like(cv.image)
        th = rng.uniform(0, 2 * math.pi)
        for _ in range(2):
            t = np.linspace(0, 1, 24)
            py = cy + t * r * 0.9 * math.sin(th)
            px = cx + t * r * 0.9 * math.cos(th)
            iy = np.clip((py * cv.scale).astype(int), 0, cv.size - 1)
            ix = np.clip((px * cv.scale).astype(int), 0, cv.size - 1)
            bron[iy, ix] = 1.0
            th += rng.uniform(0.4, 0.9)
        bron = ndimage.gaussian_filter(bron, 0.4 * cv.scale) * 2
        value = cv.values["soft"] * rng.uniform(0.9, 1.02) - 0.15 * np.clip(bron, 0, 1)
        _blend(cv, alpha, value)
        mask |= alpha > 0.4
    zone = zones[0]
    return mask, {"size": size, "count": count, "side": side0, "zone": zone}


def describe_consolidation(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn consolidation from its attributes (phrasing drawn with ``rng``)."""
    size, count = attrs.get("size", "large"), attrs.get("count", 1)
    loc = location_phrase(attrs.get("side", "right"), attrs.get("zone"), rng)
    if count > 1:
        main = pick(rng, [f"{NUMBER_WORDS[count]} {size} patchy ill-defined airspace opacities {loc}",
                          f"multifocal {size} irregular hazy opacities {loc}", f"multiple patchy dense areas {loc}"])
    else:
        main = pick(rng, [f"a {size} patchy ill-defined airspace opacity {loc}", f"a {size} irregular fluffy dense area {loc}",
                          f"{size} confluent irregular opacification {loc}", f"a {size} poorly marginated opacity {loc}"])
    extras = ["air bronchograms", "irregular blurred margins", "an ill-defined border", "a lobar distribution"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# atelectasis
# ----------------------------------------------------------------------------------------------
def draw_atelectasis(cv: Canvas, rng: np.random.Generator):
    """Draw atelectasis onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    count = 1 if rng.random() < 0.75 else 2
    mask = np.zeros((cv.size, cv.size), bool)
    side = "right" if rng.random() < 0.5 else "left"
    zone = "lower" if rng.random() < 0.7 else "middle"
    for _ in range(count):
        cy, cx, side, zone = cv.lung_point(rng, side=side, zone=zone, margin=2.5)
        length, width = rng.uniform(5.0, 8.0), rng.uniform(0.6, 1.1)
        alpha = cv.soft_disk(cy, cx, width, length, rng.uniform(-25, 25), edge=0.7) * cv.lungs[side]
        _blend(cv, alpha * 0.9, cv.values["soft"] * rng.uniform(0.9, 1.0))
        mask |= alpha > 0.5
    return mask, {"count": count, "side": side, "zone": zone, "shape": "linear"}


def describe_atelectasis(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn atelectasis from its attributes (phrasing drawn with ``rng``)."""
    loc = location_phrase(attrs.get("side", "right"), attrs.get("zone"), rng)
    n = attrs.get("count", 1)
    if n > 1:
        main = pick(rng, [f"{NUMBER_WORDS[n]} thin linear bands of opacity {loc}", f"multiple streaky linear densities {loc}",
                          f"{NUMBER_WORDS[n]} plate-like horizontal lines {loc}"])
    else:
        main = pick(rng, [f"a thin linear band of opacity {loc}", f"a streaky plate-like density {loc}",
                          f"a horizontal linear opacity {loc}", f"a thin elongated discoid shadow {loc}"])
    extras = ["mild volume loss", "a subsegmental pattern", "no mass effect", "sharp thin edges"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# pneumothorax
# ----------------------------------------------------------------------------------------------
def draw_pneumothorax(cv: Canvas, rng: np.random.Generator):
    """Draw pneumothorax onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    side = "right" if rng.random() < 0.5 else "left"
    size = "small" if rng.random() < 0.5 else "large"
    lung = cv.lungs[side]
    y0, y1, x0, x1 = cv.lung_boxes[side]
    cy, cx, ry, rx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    f = rng.uniform(0.14, 0.22) if size == "small" else rng.uniform(0.3, 0.42)
    medial = 1.0 if side == "right" else -1.0  # image-x direction toward the mediastinum
    collapsed = cv.ellipse(cy + f * ry * 0.6, cx + medial * f * rx * 0.9, ry * (1 - f * 0.7), rx * (1 - f * 1.2))
    region = lung & ~collapsed
    alpha = ndimage.gaussian_filter(region.astype(np.float32), 0.35 * cv.scale)
    dark = cv.values["lung"] * rng.uniform(0.35, 0.55)
    _blend(cv, alpha, dark)  # air without lung markings
    edge = collapsed & lung & ~ndimage.binary_erosion(collapsed, iterations=max(1, int(round(cv.scale))))
    cv.image = np.where(edge, cv.image + 0.12, cv.image).astype(np.float32)  # visceral pleural line
    return region, {"side": side, "size": size, "zone": "apical"}


def describe_pneumothorax(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn pneumothorax from its attributes (phrasing drawn with ``rng``)."""
    side, size = attrs.get("side", "right"), attrs.get("size", "small")
    main = pick(rng, [f"a {size} dark lucent space without lung markings at the {side} apex and lateral chest",
                      f"a {size} {side} apical and lateral air collection", f"{size} absent vascular markings along the {side} lung edge",
                      f"a {size} hyperlucent rim around the {side} lung"])
    extras = ["a thin visceral pleural line", "a sharp white line of the lung edge", "a partially collapsed lung", "no lung texture peripherally"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# mass and nodule: round well-defined dense lesions differing in size and count
# ----------------------------------------------------------------------------------------------
def _round_lesions(cv: Canvas, rng: np.random.Generator, count: int, r_range: tuple[float, float],
                   oval: float, lobulated: bool, value_gain: tuple[float, float]):
    mask = np.zeros((cv.size, cv.size), bool)
    side0 = "right" if rng.random() < 0.5 else "left"
    locs = []
    radii = []
    for k in range(count):
        r = rng.uniform(*r_range)
        side = side0 if (k == 0 or rng.random() < 0.6) else ("left" if side0 == "right" else "right")
        for _ in range(10):  # avoid overlapping lesions
            cy, cx, side, zone = cv.lung_point(rng, side=side, margin=max(1.5, r * 0.6))
            if all((cy - a) ** 2 + (cx - b) ** 2 > (r + rr + 1.5) ** 2 for a, b, rr in [(l[0], l[1], l[4]) for l in locs]):
                break
        ry = r * (1 + oval * rng.random())
        alpha = cv.soft_disk(cy, cx, ry, r, rng.uniform(0, 180), edge=0.55)
        if lobulated:
            for _ in range(3):
                a = rng.uniform(0, 2 * math.pi)
                alpha = np.maximum(alpha, cv.soft_disk(cy + 0.7 * r * math.sin(a), cx + 0.7 * r * math.cos(a), 0.45 * r, 0.45 * r, edge=0.55))
        gain = rng.uniform(*value_gain)
        _blend(cv, alpha, cv.values["soft"] * gain)
        mask |= alpha > 0.5
        locs.append((cy, cx, side, zone, r))
        radii.append(r)
    sides = {l[2] for l in locs}
    side = side0 if len(sides) == 1 else "bilateral"
    return mask, {"count": count, "side": side, "zone": locs[0][3] if len(sides) == 1 else None,
                  "radius": round(float(np.mean(radii)) / BASE_SIZE_CM, 2)}


# 64 px ~ 35 cm of chest: used for the "N cm" words in descriptions
BASE_SIZE_CM = 64 / 35.0


def draw_mass(cv: Canvas, rng: np.random.Generator):
    """Draw mass onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    count = 1 if rng.random() < 0.85 else 2
    lob = rng.random() < 0.3
    mask, attrs = _round_lesions(cv, rng, count, (5.0, 8.0), oval=0.35, lobulated=lob, value_gain=(1.0, 1.15))
    attrs.update(shape="lobulated" if lob else pick(rng, ["round", "oval"]), size="large")
    return mask, attrs


def describe_mass(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn mass from its attributes (phrasing drawn with ``rng``)."""
    n, shape = attrs.get("count", 1), attrs.get("shape", "round")
    loc = location_phrase(attrs.get("side", "right"), attrs.get("zone"), rng)
    cm = max(3, int(round(2 * attrs.get("radius", 3.5))))
    if n > 1:
        main = pick(rng, [f"{NUMBER_WORDS[n]} large {shape} well-defined dense opacities {loc}",
                          f"multiple large {shape} bright lesions {loc}", f"{NUMBER_WORDS[n]} bulky sharply marginated {shape} densities {loc}"])
    else:
        main = pick(rng, [f"a large {shape} well-defined dense opacity {loc}", f"a single bulky {shape} bright lesion {loc}",
                          f"a {cm} cm {shape} sharply marginated density {loc}", f"a solitary large {shape} opacity {loc}"])
    extras = [f"a diameter of about {cm} cm", "smooth well-defined margins", "homogeneous density", "no air bronchograms"]
    return join_phrases(main, extras, rng)


def draw_nodule(cv: Canvas, rng: np.random.Generator):
    """Draw nodule onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    count = int(rng.choice([1, 2, 3], p=[0.4, 0.35, 0.25]))
    mask, attrs = _round_lesions(cv, rng, count, (1.6, 2.7), oval=0.15, lobulated=False, value_gain=(1.05, 1.25))
    attrs.update(shape="round", size="small")
    return mask, attrs


def describe_nodule(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn nodule from its attributes (phrasing drawn with ``rng``)."""
    n = attrs.get("count", 1)
    loc = location_phrase(attrs.get("side", "right"), attrs.get("zone"), rng)
    cm = max(1, int(round(2 * attrs.get("radius", 1.0))))
    if n > 1:
        main = pick(rng, [f"{NUMBER_WORDS[n]} small round well-defined bright opacities {loc}",
                          f"multiple small round dense spots {loc}", f"{NUMBER_WORDS[n]} tiny sharply marginated round densities {loc}"])
    else:
        main = pick(rng, [f"a small round well-defined bright opacity {loc}", f"a single tiny round dense spot {loc}",
                          f"a {cm} cm round sharply marginated density {loc}", f"a solitary small round opacity {loc}"])
    extras = [f"a diameter of about {cm} cm", "smooth well-defined margins", "homogeneous density", "no air bronchograms"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# extra held-out findings for the generality protocol (issue 14): registered, never in
# BUILTIN_FINDINGS (the shipped model and the default class lists are unchanged); the model
# ``phantom_clip_heldout3`` holds out nodule, cavity and pneumoperitoneum
# ----------------------------------------------------------------------------------------------
def draw_cavity(cv: Canvas, rng: np.random.Generator):
    """Draw cavity onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    """A round lesion with a bright thick wall and a dark air-filled centre (mostly upper zones)."""
    count = 1 if rng.random() < 0.8 else 2
    side0 = "right" if rng.random() < 0.5 else "left"
    mask = np.zeros((cv.size, cv.size), bool)
    locs, radii, walls = [], [], []
    for k in range(count):
        r = rng.uniform(3.2, 5.0)
        wall = rng.uniform(1.1, 1.8)
        side = side0 if k == 0 else ("left" if side0 == "right" else "right")
        zone = "upper" if rng.random() < 0.6 else "middle"
        cy, cx, side, zone = cv.lung_point(rng, side=side, zone=zone, margin=r * 0.8)
        outer = cv.soft_disk(cy, cx, r * (1 + 0.15 * rng.random()), r, rng.uniform(0, 180), edge=0.55)
        _blend(cv, outer, cv.values["soft"] * rng.uniform(1.0, 1.15))
        inner = cv.soft_disk(cy, cx, r - wall, r - wall, edge=0.5)
        _blend(cv, inner, cv.values["lung"] * rng.uniform(0.55, 0.8))
        mask |= outer > 0.5
        locs.append((side, zone))
        radii.append(r)
        walls.append(wall)
    sides = {s for s, _ in locs}
    return mask, {"count": count, "side": side0 if len(sides) == 1 else "bilateral",
                  "zone": locs[0][1] if len(sides) == 1 else None,
                  "radius": round(float(np.mean(radii)) / BASE_SIZE_CM, 2), "thick": float(np.mean(walls)) > 1.45}


def describe_cavity(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn cavity from its attributes (phrasing drawn with ``rng``)."""
    n = attrs.get("count", 1)
    loc = location_phrase(attrs.get("side", "right"), attrs.get("zone"), rng)
    wall = "thick-walled" if attrs.get("thick") else pick(rng, ["thick-walled", "thin-walled"])
    if n > 1:
        main = pick(rng, [f"two round {wall} lesions with dark lucent centres {loc}",
                          f"two ring-shaped opacities with central air {loc}"])
    else:
        main = pick(rng, [f"a round {wall} lesion with a dark lucent centre {loc}",
                          f"a ring-shaped opacity with a bright rim and central air {loc}",
                          f"a round lucent space surrounded by a dense wall {loc}",
                          f"a hollow round opacity with central lucency {loc}"])
    extras = ["a bright well-defined rim", "air inside the lesion", "no fluid level", "a smooth inner wall"]
    return join_phrases(main, extras, rng)


def draw_pneumoperitoneum(cv: Canvas, rng: np.random.Generator):
    """Draw pneumoperitoneum onto ``cv`` -> (its pixel mask, the attributes drawn: size, location, ...)."""
    """A dark crescent of free air under one or both diaphragm domes (below the lung base)."""
    u = rng.random()
    sides = ["right"] if u < 0.6 else (["left"] if u < 0.8 else ["right", "left"])
    mask = np.zeros((cv.size, cv.size), bool)
    thick = rng.uniform(1.4, 2.6)
    for side in sides:
        lung = cv.lungs[side]
        cols = np.where(lung.any(0))[0]
        if len(cols) < 4:
            continue
        # the inner two thirds of the lung's width, where the dome is highest
        c0 = cols[0] + len(cols) // 6
        c1 = cols[-1] - len(cols) // 6
        base = np.full(cv.size, -1.0)
        for c in range(c0, c1 + 1):
            rows = np.where(lung[:, c])[0]
            if len(rows):
                base[c] = cv.yy[rows[-1], c]  # the dome's height in this column (64-px units)
        below = (cv.yy > base[None, :] + 0.9) & (cv.yy < base[None, :] + 0.9 + thick) & (base[None, :] > 0)
        alpha = ndimage.gaussian_filter(below.astype(np.float32), 0.5 * cv.scale)
        _blend(cv, np.clip(alpha * 1.4, 0, 1), cv.values["lung"] * rng.uniform(0.5, 0.8))
        mask |= alpha > 0.4
    side_word = "bilateral" if len(sides) == 2 else sides[0]
    return mask, {"side": side_word, "size": "large" if thick > 2.1 else "small"}


def describe_pneumoperitoneum(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn pneumoperitoneum from its attributes (phrasing drawn with ``rng``)."""
    side, size = attrs.get("side", "right"), attrs.get("size", "small")
    where = "beneath both hemidiaphragms" if side == "bilateral" else f"beneath the {side} hemidiaphragm"
    main = pick(rng, [f"a {'thin' if size == 'small' else 'broad'} dark crescent of free air {where}",
                      f"a lucent crescent {where}", f"free gas under the diaphragm {where.replace('beneath ', 'on ')}",
                      f"a dark curved band of air {where}"])
    extras = ["a sharp outline of the diaphragm", "clear lungs", "air outlining the upper abdomen", "a normal heart size"]
    return join_phrases(main, extras, rng)


# ----------------------------------------------------------------------------------------------
# final-evaluation finding of the unlabeled-pool protocol (issue 20): registered, never in
# BUILTIN_FINDINGS nor in any shipped model's pretraining config (no image, no text of it was ever
# seen); used only to report, never to choose a recipe (benchmarks/phantom_pool)
# ----------------------------------------------------------------------------------------------
def draw_hiatal_hernia(cv: Canvas, rng: np.random.Generator):
    """Draw a hiatal hernia onto ``cv`` -> (its pixel mask, the attributes drawn).

    A round gas bubble projected over the lower heart shadow near the midline (retrocardiac), its
    lower part filled with fluid up to a sharp horizontal air-fluid level, inside a thin soft-tissue wall.
    """
    cy, cx, ry, rx = cv.heart
    size = "large" if rng.random() < 0.4 else "small"
    r = rng.uniform(4.2, 5.2) if size == "large" else rng.uniform(3.0, 4.0)
    by = cy + ry * rng.uniform(0.05, 0.35)  # low behind the heart, above the diaphragm
    bx = cx + rng.uniform(-2.0, 1.0)  # near the midline (the heart sits left of it)
    wall = cv.soft_disk(by, bx, r + 0.8, r + 0.8, edge=0.5)
    _blend(cv, wall, cv.values["soft"] * rng.uniform(1.1, 1.2))
    bubble = cv.soft_disk(by, bx, r * rng.uniform(0.9, 1.05), r, rng.uniform(0, 180), edge=0.5)
    level = by + r * rng.uniform(-0.15, 0.35)  # the air-fluid level (image y grows downward)
    air = bubble * np.clip((level - cv.yy) * 2.0 + 0.5, 0, 1)  # sharp horizontal edge
    fluid = bubble - air
    _blend(cv, air, cv.values["lung"] * rng.uniform(0.7, 1.0))
    _blend(cv, fluid, cv.values["soft"] * rng.uniform(1.0, 1.08))
    return wall > 0.5, {"size": size, "level": True}


def describe_hiatal_hernia(attrs: dict, rng: np.random.Generator) -> str:
    """A report-style description of a drawn hiatal hernia from its attributes (phrasing drawn with ``rng``)."""
    size = attrs.get("size", "small")
    main = pick(rng, [f"a {size} round gas lucency behind the heart with an air-fluid level",
                      f"a {size} retrocardiac air bubble with a horizontal fluid level",
                      f"a {size} round dark air-filled space projected over the heart shadow",
                      f"a {size} rounded lucency behind the heart above the diaphragm"])
    extras = ["a horizontal air-fluid level", "a thin soft-tissue wall", "clear lungs", "a normal heart size"]
    return join_phrases(main, extras, rng)


DEFINITIONS = {
    "no finding": "a normal chest x-ray with clear lungs and a normal heart",
    "cardiomegaly": "cardiomegaly is an enlarged heart wider than half of the chest",
    "pleural effusion": "a pleural effusion is fluid collecting at the lung base with a meniscus",
    "edema": "edema is diffuse bilateral hazy opacity around both hila",
    "consolidation": "consolidation is a patchy ill-defined airspace opacity with air bronchograms",
    "atelectasis": "atelectasis is a thin linear band of collapsed lung",
    "pneumothorax": "a pneumothorax is air without lung markings between the lung and the chest wall",
    "mass": "a mass is a large round well-defined dense lesion larger than 3 cm",
    "nodule": "a nodule is a small round well-defined dense opacity smaller than 3 cm, sometimes multiple",
    "cavity": "a cavity is a round lesion with a thick bright wall and a dark air-filled lucent centre",
    "pneumoperitoneum": "pneumoperitoneum is free air under the diaphragm, a dark crescent below the lung base",
    "hiatal hernia": "a hiatal hernia is stomach pushed up behind the heart, a round gas bubble with an air-fluid level",
}

#: findings drawn only for the generality protocol (held out by ``phantom_clip_heldout3``)
EXTRA_HELD_OUT = ("cavity", "pneumoperitoneum")

#: findings used only for the final evaluation of the unlabeled-pool protocol (never drawn or named
#: by any shipped model's pretraining, never used to choose anything)
FINAL_EVAL_FINDINGS = ("hiatal hernia",)

BUILTIN_FINDINGS = ("no finding", "cardiomegaly", "pleural effusion", "edema", "consolidation", "atelectasis",
                    "pneumothorax", "mass", "nodule")

for _name, _draw, _desc in (
    ("no finding", draw_no_finding, describe_no_finding),
    ("cardiomegaly", draw_cardiomegaly, describe_cardiomegaly),
    ("pleural effusion", draw_pleural_effusion, describe_pleural_effusion),
    ("edema", draw_edema, describe_edema),
    ("consolidation", draw_consolidation, describe_consolidation),
    ("atelectasis", draw_atelectasis, describe_atelectasis),
    ("pneumothorax", draw_pneumothorax, describe_pneumothorax),
    ("mass", draw_mass, describe_mass),
    ("nodule", draw_nodule, describe_nodule),
    ("cavity", draw_cavity, describe_cavity),
    ("pneumoperitoneum", draw_pneumoperitoneum, describe_pneumoperitoneum),
    ("hiatal hernia", draw_hiatal_hernia, describe_hiatal_hernia),
):
    register_finding(_name, _draw, _desc, definition=DEFINITIONS[_name], overwrite=True)
