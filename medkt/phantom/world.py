"""Procedural chest X-ray phantoms: anatomy, a findings plugin registry, and datasets.

A phantom is a ``size x size`` grayscale image in [0, 1] (bright = dense, dark = air): body
ellipse, two textured lungs with vessels and faint ribs, diaphragm domes, mediastinum and heart,
then blur and quantum noise. A *finding* is a registered plugin (`register_finding`) that
paints onto the `Canvas` before acquisition blur/noise, returns its pixel mask and the
attributes it drew (size, shape, brightness, location, count), and writes varied attribute
descriptions from those attributes.

Everything is deterministic by seed: image ``i`` of a dataset uses
``numpy.random.default_rng([seed, i, finding_index])``.

Sides follow the radiological convention: the patient's right lung is on the image's left.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from medkt.errors import ConfigError, unknown_name
from medkt.registry import Registry

#: geometry is designed at 64 px and scaled for other sizes
BASE_SIZE = 64


# ----------------------------------------------------------------------------------------------
# canvas
# ----------------------------------------------------------------------------------------------
@dataclass
class Canvas:
    """The phantom being drawn: pixel field and the anatomy a finding can paint relative to.

    Attributes:
        image: ``(S, S)`` float32, linear attenuation-like intensity (clipped to [0, 1] at the end).
        size: ``S`` in pixels.
        yy, xx: ``(S, S)`` pixel-centre coordinates in *64-px units* (geometry is size-independent).
        lungs: ``{"right": mask, "left": mask}`` boolean ``(S, S)`` lung fields (patient sides).
        lung_boxes: ``{"right": (y0, y1, x0, x1)}`` in 64-px units.
        heart: ``(cy, cx, ry, rx)`` of the cardiac ellipse in 64-px units.
        thorax_width: inner thoracic width (64-px units) for the cardiothoracic ratio.
        values: reference intensities (``lung``, ``soft``, ``dense``) of this phantom.
    """

    image: np.ndarray
    size: int
    yy: np.ndarray
    xx: np.ndarray
    lungs: dict[str, np.ndarray]
    lung_boxes: dict[str, tuple[float, float, float, float]]
    heart: tuple[float, float, float, float]
    thorax_width: float
    values: dict[str, float]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def scale(self) -> float:
        """Pixels per 64-px unit."""
        return self.size / BASE_SIZE

    @property
    def lung_union(self) -> np.ndarray:
        """Boolean mask ``(S, S)`` of both lungs."""
        return self.lungs["right"] | self.lungs["left"]

    def ellipse(self, cy: float, cx: float, ry: float, rx: float, angle_deg: float = 0.0) -> np.ndarray:
        """Boolean mask of an ellipse (64-px units; angle counter-clockwise in degrees)."""
        return self.ellipse_field(cy, cx, ry, rx, angle_deg) <= 1.0

    def ellipse_field(self, cy: float, cx: float, ry: float, rx: float, angle_deg: float = 0.0) -> np.ndarray:
        """Normalised squared radius ``((x'/rx)^2 + (y'/ry)^2)`` of every pixel (1 on the rim)."""
        a = math.radians(angle_deg)
        dy, dx = self.yy - cy, self.xx - cx
        u = dx * math.cos(a) + dy * math.sin(a)
        v = -dx * math.sin(a) + dy * math.cos(a)
        return (u / max(rx, 1e-3)) ** 2 + (v / max(ry, 1e-3)) ** 2

    def soft_disk(self, cy: float, cx: float, ry: float, rx: float, angle_deg: float = 0.0, edge: float = 0.6) -> np.ndarray:
        """Anti-aliased ellipse in [0, 1]; ``edge`` is the blur width in 64-px units (sharp ~0.5)."""
        r = np.sqrt(self.ellipse_field(cy, cx, ry, rx, angle_deg)) * min(ry, rx)
        return np.clip((min(ry, rx) - r) / max(edge, 1e-3) + 0.5, 0.0, 1.0).astype(np.float32)

    def smooth_noise(self, rng: np.random.Generator, sigma: float) -> np.ndarray:
        """Unit-variance Gaussian random field with correlation length ``sigma`` (64-px units)."""
        f = ndimage.gaussian_filter(rng.standard_normal((self.size, self.size)).astype(np.float32), sigma * self.scale)
        return f / (f.std() + 1e-6)

    def lung_point(
        self, rng: np.random.Generator, side: str | None = None, zone: str | None = None, margin: float = 2.0
    ) -> tuple[float, float, str, str]:
        """A random point inside a lung at least ``margin`` from its edge -> ``(y, x, side, zone)``.

        ``zone`` is ``upper``/``middle``/``lower`` thirds of the lung's height.
        """
        side = side or ("right" if rng.random() < 0.5 else "left")
        lung = self.lungs[side]
        inner = ndimage.binary_erosion(lung, iterations=max(1, int(round(margin * self.scale))))
        if not inner.any():
            inner = lung
        y0, y1, _, _ = self.lung_boxes[side]
        h = (y1 - y0) / 3.0
        if zone is None:
            zone = ("upper", "middle", "lower")[int(rng.integers(3))]
        zi = {"upper": 0, "middle": 1, "lower": 2}[zone]
        band = (self.yy >= y0 + zi * h) & (self.yy < y0 + (zi + 1) * h)
        cand = np.argwhere(inner & band)
        if len(cand) == 0:
            cand = np.argwhere(inner)
        py, px = cand[int(rng.integers(len(cand)))]
        return float(self.yy[py, px]), float(self.xx[py, px]), side, zone


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(size, dtype=np.float32) + 0.5) * (BASE_SIZE / size)
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy, xx


def draw_anatomy(rng: np.random.Generator, size: int = 64) -> Canvas:
    """A normal chest: body, textured lungs with vessels and ribs, domes, mediastinum, heart."""
    yy, xx = _grid(size)
    cv = Canvas(np.zeros((size, size), np.float32), size, yy, xx, {}, {}, (0, 0, 0, 0), 0.0, {})
    soft = float(rng.uniform(0.52, 0.62))
    lung_v = float(rng.uniform(0.16, 0.24))
    dense = float(rng.uniform(0.78, 0.88))
    cv.values = {"soft": soft, "lung": lung_v, "dense": dense}
    img = np.full((size, size), float(rng.uniform(0.02, 0.06)), np.float32)
    # body and shoulders
    bcx, bcy = 32 + rng.normal(0, 0.6), 34 + rng.normal(0, 0.6)
    body = cv.soft_disk(bcy, bcx, 31.5 + rng.normal(0, 0.5), 28.5 + rng.normal(0, 0.7), edge=1.2)
    img = img * (1 - body) + soft * body
    # lungs: ellipses cut by the diaphragm domes
    ang = rng.normal(0, 2.0)
    half_gap = rng.uniform(11.0, 13.0)
    lry, lrx = rng.uniform(16.5, 19.0), rng.uniform(8.5, 10.5)
    lcy = bcy - rng.uniform(4.0, 6.0)
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        cx = bcx + sgn * half_gap + rng.normal(0, 0.4)
        cy = lcy + rng.normal(0, 0.4)
        lung = cv.ellipse(cy, cx, lry, lrx, sgn * (6 + ang))
        dome_y = cy + lry * rng.uniform(0.55, 0.72) + (1.5 if side == "left" else 0.0)
        dome = dome_y - 0.045 * (xx - cx) ** 2 - 1.2  # convex upward dome
        lung &= yy < dome
        cv.lungs[side] = lung
        ys, xs = yy[lung], xx[lung]
        cv.lung_boxes[side] = (float(ys.min()), float(ys.max()), float(xs.min()), float(xs.max()))
    lungs = cv.lung_union.astype(np.float32)
    lungs_soft = ndimage.gaussian_filter(lungs, 0.7 * cv.scale)
    # parenchymal texture + vessels radiating from the hila
    texture = 0.025 * cv.smooth_noise(rng, 1.2)
    vessels = np.zeros_like(img)
    for side, sgn in (("right", -1.0), ("left", 1.0)):
        hy, hx = lcy + rng.uniform(2, 5), bcx + sgn * rng.uniform(5.0, 7.0)
        for _ in range(int(rng.integers(5, 9))):
            th = rng.uniform(-0.9 * math.pi, 0.9 * math.pi) * 0.6 + (math.pi if sgn < 0 else 0.0)
            length = rng.uniform(6, 15)
            t = np.linspace(0, 1, 48)
            py = hy + t * length * math.sin(th) + rng.normal(0, 0.6) * t**2 * 3
            px = hx + t * length * math.cos(th)
            # splat the centre line, then blur it into a tapering vessel (fast vs per-point exp)
            iy = np.clip((py * cv.scale).astype(int), 0, size - 1)
            ix = np.clip((px * cv.scale).astype(int), 0, size - 1)
            np.maximum.at(vessels, (iy, ix), 1.0 - 0.7 * t)
    vessels = ndimage.gaussian_filter(vessels, 0.6 * cv.scale) * 2.5
    ribs = np.zeros_like(img)
    for k in range(6):
        ry0 = lcy - lry + 4 + k * rng.uniform(4.6, 5.4)
        ribs += np.exp(-((yy - (ry0 + 0.03 * (xx - bcx) ** 2)) ** 2) / (2 * 0.8**2))
    lung_field = lung_v + texture + 0.10 * vessels + 0.05 * np.clip(ribs, 0, 1)
    img = img * (1 - lungs_soft) + lung_field * lungs_soft
    # mediastinum (spine + great vessels) and heart
    med = cv.soft_disk(bcy - 12, bcx + rng.normal(0, 0.4), 11, rng.uniform(3.2, 4.2), edge=1.0)
    img = np.maximum(img, soft * 1.08 * med)
    hcy, hcx = bcy + rng.uniform(3.0, 5.5), bcx + rng.uniform(1.0, 2.8)
    hrx, hry = rng.uniform(7.5, 9.0), rng.uniform(6.0, 7.5)
    cv.heart = (hcy, hcx, hry, hrx)
    cv.thorax_width = 2 * (half_gap + lrx)
    heart = cv.soft_disk(hcy, hcx, hry, hrx, rng.normal(0, 6), edge=1.0)
    img = img * (1 - heart) + (soft * 1.12) * heart
    cv.image = img.astype(np.float32)
    return cv


def acquire(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Detector blur + exposure + quantum noise -> final [0, 1] image ``(S, S)`` float32."""
    img = ndimage.gaussian_filter(cv.image, rng.uniform(0.45, 0.75) * cv.scale)
    gain = rng.uniform(0.92, 1.08)
    img = img * gain + rng.normal(0, 0.015)
    img = img + rng.uniform(0.008, 0.02) * rng.standard_normal(img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# findings registry
# ----------------------------------------------------------------------------------------------
DrawFn = Callable[[Canvas, np.random.Generator], "tuple[np.ndarray, dict[str, Any]]"]
DescribeFn = Callable[[dict, np.random.Generator], str]


@dataclass(frozen=True)
class Finding:
    """A finding plugin.

    Attributes:
        name: display name used in prompts (``"pleural effusion"``).
        draw: ``draw(canvas, rng) -> (mask (S,S) bool, attributes dict)``; paints onto
            ``canvas.image`` in place (before acquisition blur/noise).
        describe: ``describe(attributes, rng) -> str``: a varied attribute description *without
            the finding's name* (e.g. "two small round bright opacities in the right upper lung").
        definition: optional textbook sentence(s) about the finding as a whole.
    """

    name: str
    draw: DrawFn
    describe: DescribeFn
    definition: str = ""


#: registered findings; the built-in ones (`medkt.phantom.findings`, which imports this
#: module) are loaded on the first lookup through the entry-point group ``medkt.phantom_findings``;
#: plug-in modules of a bundle through `load_plugins`
FINDINGS: Registry[Finding] = Registry("finding", group="medkt.phantom_findings")


def register_finding(
    name: str, draw: DrawFn, describe: DescribeFn, *, definition: str = "", overwrite: bool = False
) -> Finding:
    """Register a finding plugin (usable from outside the package; see `Finding`)."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"finding name must be a non-empty string, got {name!r}")
    if not callable(draw) or not callable(describe):
        raise ConfigError(f"finding {name!r}: draw and describe must be callables")
    f = Finding(name.strip(), draw, describe, definition)
    return FINDINGS.register(f.name, f, overwrite=overwrite)


def unregister_finding(name: str) -> None:
    """Remove a registered finding (tests use this to clean up)."""
    FINDINGS.unregister(name)


def get_finding(name: str) -> Finding:
    """The registered finding ``name``; an unknown one is an error listing the known findings."""
    if name not in FINDINGS:
        err = unknown_name("finding", name, FINDINGS.names())
        # a plugin finding is registered when its module is imported (bundle option ``plugins``)
        raise type(err)(f"{err} A finding from a plugin module needs that module imported first "
                        f"(bundle option plugins=[\"my_module\"]).")
    return FINDINGS.get(name)


def load_plugins(modules: Sequence[str] | None) -> list[str]:
    """Import finding plugin modules (each calls `register_finding` at import).

    Returns the findings that were newly registered. A module that cannot be imported is a
    `ConfigError` naming it.
    """
    import importlib

    if isinstance(modules, str):
        modules = [modules]
    before = set(FINDINGS.names())
    for m in modules or []:
        if not isinstance(m, str) or not m.strip():
            raise ConfigError(f"plugins must be a list of module names, got {m!r}")
        try:
            importlib.import_module(m.strip())
        except ImportError as exc:
            raise ConfigError(f"cannot import finding plugin module {m!r} ({exc}); put it on PYTHONPATH or "
                              "install it") from exc
    return [f for f in FINDINGS.names() if f not in before]


def list_findings() -> list[str]:
    """Registered finding names in registration order."""
    return FINDINGS.names()


# ----------------------------------------------------------------------------------------------
# phantoms and datasets
# ----------------------------------------------------------------------------------------------
@dataclass
class Phantom:
    """One synthetic chest X-ray: the image, the finding's mask, its name and the drawn attributes."""

    image: np.ndarray  # (S, S) float32 in [0, 1]
    mask: np.ndarray  # (S, S) bool, the finding's pixels (empty for no finding / global findings)
    finding: str
    attributes: dict[str, Any]

    def describe(self, rng: np.random.Generator | int = 0) -> str:
        """A caption of this phantom's finding from its attributes (random wording by ``rng``)."""
        rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
        return get_finding(self.finding).describe(self.attributes, rng)


def _finding_key(name: str) -> int:
    # stable across registration order and processes (not Python's salted hash)
    return int.from_bytes(name.encode("utf-8"), "little") % (2**31 - 1)


def make_phantom(finding: str, seed: int, index: int = 0, size: int = 64) -> Phantom:
    """One phantom of ``finding``, deterministic in ``(seed, index, finding)``."""
    f = get_finding(finding)
    rng = np.random.default_rng([int(seed), int(index), _finding_key(f.name)])
    cv = draw_anatomy(rng, size)
    mask, attrs = f.draw(cv, rng)
    mask = np.zeros((size, size), bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != (size, size):
        raise ConfigError(f"finding {finding!r} returned a mask of shape {mask.shape}, expected {(size, size)}")
    image = acquire(cv, rng)
    return Phantom(image, mask, f.name, dict(attrs))


@dataclass
class PhantomSet:
    """A labelled set of phantoms: ``images (N,S,S)`` float32, ``masks (N,S,S)`` bool."""

    images: np.ndarray
    masks: np.ndarray
    labels: list[str]
    attributes: list[dict[str, Any]]
    seed: int

    def __len__(self) -> int:
        return len(self.labels)

    def tensor(self):
        """Images as a ``(N, 1, S, S)`` float tensor in [0, 1]."""
        import torch

        return torch.from_numpy(self.images[:, None].copy())

    def subset(self, idx: Sequence[int]) -> "PhantomSet":
        """The phantoms at positions ``idx`` (same seed), as a new set."""
        idx = list(idx)
        return PhantomSet(self.images[idx], self.masks[idx], [self.labels[i] for i in idx],
                          [self.attributes[i] for i in idx], self.seed)


def make_dataset(
    findings: Sequence[str], n_per_class: int, seed: int, size: int = 64, progress: bool = False
) -> PhantomSet:
    """``n_per_class`` phantoms of each finding (class-major order), deterministic by ``seed``."""
    if n_per_class < 0:
        raise ConfigError(f"n_per_class must be >= 0, got {n_per_class}")
    findings = list(findings)
    for f in findings:
        get_finding(f)
    n = len(findings) * n_per_class
    images = np.zeros((n, size, size), np.float32)
    masks = np.zeros((n, size, size), bool)
    labels: list[str] = []
    attrs: list[dict[str, Any]] = []
    from medkt.progress import track

    for k in track(range(n), "phantoms", unit="img", enabled=progress):
        f, i = findings[k // n_per_class], k % n_per_class
        p = make_phantom(f, seed, i, size)
        images[k], masks[k] = p.image, p.mask
        labels.append(p.finding)
        attrs.append(p.attributes)
    return PhantomSet(images, masks, labels, attrs, seed)

