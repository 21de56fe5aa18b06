"""Synthetic MURA-like radiograph phantoms with ground truth, and writers for PNG trees and DICOM.

Every later stage (carrier detection, body-part segmentation, training, scoring, the DICOM node) needs
an offline input whose right answer is known. A phantom is drawn in *display* units (float in [0, 1],
bone bright) from a few analytic layers, then stored as the integers a scanner would write:

1. a dark **background** with a mild linear gradient and vignette;
2. an optional X-ray **carrier**: a near-rectangular field, brighter or darker than the background,
   rotated by up to +-15 degrees and sometimes partly out of frame (long straight borders, uniform
   exterior);
3. a limb-like **body part** made of capsules (line segments with a radius): soft tissue (a plateau
   with a cylindrical thickness profile) and bones (cylindrical shells: a bright cortical rim around a
   darker medulla). Templates for MURA's seven body parts (elbow and shoulder are bent, the hand has
   fingers, carpals are round). The body part always lies inside the carrier;
4. an optional **anomaly** with its mask: ``"fracture"`` (a dark gap across a long bone), ``"implant"``
   (a saturated metal plate with screws, or an intramedullary nail/screw) or ``"lesion"`` (a dark
   lytic blob inside a bone);
5. a light 3x3 blur (projection unsharpness; metal stays sharp) and Gaussian noise;
6. burned-in **markers** outside the body part, drawn last (sharp, noise-free): an ``"L"``/``"R"``
   letter and a text box (small, bright, 5x7 bitmap glyphs).

The display image is then mapped to ``bits_stored`` integers (``uint8`` for 8 bits, ``uint16`` for
12/16 bits, values ``< 2**bits``) and, for ``MONOCHROME1``, stored inverted (bone dark).

Everything is vectorised numpy on bounding-box windows (about 10-25 ms for 512x416) and deterministic:
the same spec and seed give identical bytes.

Example:
    >>> rng = np.random.default_rng(0)
    >>> ph = make_phantom(random_spec(rng, body_part="XR_WRIST", anomaly="fracture"), seed=1)
    >>> ph.image.dtype, ph.label, bool(ph.anomaly_mask.any())
    (dtype('uint8'), 1, True)

See Also:
    ``write_mura_tree`` (MURA-v1.1 PNG layout + official CSVs + truth masks), ``write_dicom`` /
    ``write_dicom_tree`` (CR/DX DICOM), ``generate_demo_dataset`` (used by ``salad-med demo``).
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from preprocessing.atomic import atomic_path, atomic_write_text

__all__ = [
    "BODY_PARTS",
    "ANOMALIES",
    "CARRIERS",
    "EDGE_STRIPS",
    "PhantomSpec",
    "Phantom",
    "random_spec",
    "make_phantom",
    "write_png",
    "save_truth",
    "load_truth",
    "write_mura_tree",
    "write_dicom",
    "write_dicom_tree",
    "generate_demo_dataset",
    "contact_sheet",
    "MURA_PATH_PATTERN",
]

#: MURA-v1.1 body parts (folder names).
BODY_PARTS: tuple[str, ...] = (
    "XR_ELBOW", "XR_FINGER", "XR_FOREARM", "XR_HAND", "XR_HUMERUS", "XR_SHOULDER", "XR_WRIST",
)
#: Anomaly kinds (``None`` = normal).
ANOMALIES: tuple[str, ...] = ("fracture", "implant", "lesion")
#: Carrier kinds (``None`` = no carrier).
CARRIERS: tuple[str, ...] = ("bright", "dark")
#: Edge strip kinds of :attr:`PhantomSpec.edge_strip` (``None`` = none).
EDGE_STRIPS: tuple[str, ...] = ("fading", "sliver")
#: Regex matching an image path inside a MURA-v1.1 split folder.
MURA_PATH_PATTERN = r"XR_[A-Z]+/patient\d{5}/study\d+_(positive|negative)/image\d+\.png"

_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


# ----------------------------------------------------------------------------------------------
# Spec and result
# ----------------------------------------------------------------------------------------------
@dataclass
class PhantomSpec:
    """What to draw. Everything not fixed here is drawn from the seed given to :func:`make_phantom`.

    Attributes:
        height: image rows (>= 64).
        width: image columns (>= 64).
        body_part: one of :data:`BODY_PARTS`.
        carrier: ``"bright"``, ``"dark"`` (relative to the background) or ``None`` (no carrier).
        carrier_rotation: carrier rotation in degrees, ``|.| <= 15`` (positive = counter-clockwise
            as displayed).
        carrier_out_of_frame: the carrier extends past one or two image borders.
        anomaly: ``None``, ``"fracture"``, ``"implant"`` or ``"lesion"``.
        monochrome1: store inverted (``MONOCHROME1``: bone dark).
        bits_stored: 8 (``uint8``), 12 or 16 (``uint16``).
        markers: burn in an ``"L"``/``"R"`` letter and a text box outside the body part.
        noise: standard deviation of the Gaussian noise in display units ([0, 1]).
        patient_id: e.g. ``"patient00001"`` (default derived from the seed).
        study: study within the patient and body part, e.g. ``"study1"`` (default ``"study1"``).
        anomaly_scale: conspicuity of the anomaly, a size multiplier in ``[0.25, 8]``: fracture gap
            width, lesion radii, implant length/thickness and screw size (1 = the default, realistic
            small anomaly; 3-4 makes it clearly visible after a 512 -> 64 downsampling). The anomaly
            stays inside the body part.

    The options below reproduce the failure families of body-part segmentation on real radiographs
    (issue 17). They are off by default and draw from a random stream of their own, so every other
    phantom stays byte-identical:

    Attributes:
        markers_touching: the L/R letter and the text box touch the body part's outline (burned in
            over the skin line, as on FracAtlas); they stay outside ``body_mask``.
        edge_strip: ``"fading"`` (an unexposed detector strip along one side, bright at the frame and
            fading inwards over ~6 % of the side) or ``"sliver"`` (a thin, flat, bright collimator band,
            ~2 % of the side); in ``strip_mask``, never body.
        divider: a double exposure: the image holds two fields side by side, each with its own
            background level and its own copy of the body part, separated by a white unexposed band with
            grey penumbra strips (``strip_mask``); the carrier, if any, is left out.
        fill_frame: a trunk (a wide ellipse of soft tissue) behind the limb fills ~90 % of the frame,
            leaving background only in the corners (an infant on the detector).
    """

    height: int = 512
    width: int = 416
    body_part: str = "XR_WRIST"
    carrier: str | None = "bright"
    carrier_rotation: float = 0.0
    carrier_out_of_frame: bool = False
    anomaly: str | None = None
    monochrome1: bool = False
    bits_stored: int = 8
    markers: bool = True
    noise: float = 0.015
    patient_id: str | None = None
    study: str | None = None
    anomaly_scale: float = 1.0
    markers_touching: bool = False
    edge_strip: str | None = None
    divider: bool = False
    fill_frame: bool = False

    def __post_init__(self) -> None:
        problems = []
        if int(self.height) < 64 or int(self.width) < 64:
            problems.append(f"size {self.height}x{self.width} is below 64x64")
        if self.body_part not in BODY_PARTS:
            problems.append(f"body_part {self.body_part!r} not in {BODY_PARTS}")
        if self.carrier not in (*CARRIERS, None):
            problems.append(f"carrier {self.carrier!r} not in {(*CARRIERS, None)}")
        if not abs(float(self.carrier_rotation)) <= 15.0:
            problems.append(f"carrier_rotation {self.carrier_rotation} outside [-15, 15] degrees")
        if self.anomaly not in (*ANOMALIES, None):
            problems.append(f"anomaly {self.anomaly!r} not in {(*ANOMALIES, None)}")
        if self.bits_stored not in (8, 12, 16):
            problems.append(f"bits_stored {self.bits_stored} not in (8, 12, 16)")
        if not 0.0 <= float(self.noise) <= 0.2:
            problems.append(f"noise {self.noise} outside [0, 0.2]")
        if not 0.25 <= float(self.anomaly_scale) <= 8.0:
            problems.append(f"anomaly_scale {self.anomaly_scale} outside [0.25, 8]")
        if self.edge_strip not in (*EDGE_STRIPS, None):
            problems.append(f"edge_strip {self.edge_strip!r} not in {(*EDGE_STRIPS, None)}")
        if problems:
            msg = "invalid PhantomSpec: " + "; ".join(problems)
            raise ValueError(msg)


@dataclass
class Phantom:
    """A synthetic radiograph and its ground truth.

    Attributes:
        image: (H, W) ``uint8`` (8 bits) or ``uint16`` (12/16 bits) as stored; ``MONOCHROME1`` images
            are stored inverted (bone dark). Values ``< 2**bits_stored``.
        bits_stored: 8, 12 or 16.
        photometric: ``"MONOCHROME1"`` or ``"MONOCHROME2"``.
        carrier_polygon: (4, 2) float ``(x, y)`` corners (x = column, y = row, pixel centres at
            integers) in drawing order, possibly outside the frame; ``None`` without a carrier.
        carrier_mask: (H, W) bool, the polygon clipped to the frame (all False without a carrier).
        body_mask: (H, W) bool, soft tissue + bone + implant.
        bone_mask: (H, W) bool, bones (before anomalies).
        anomaly_mask: (H, W) bool, inside ``body_mask``; all False when ``label == 0``.
        marker_mask: (H, W) bool, burned-in letter and text box (disjoint from ``body_mask``).
        strip_mask: (H, W) bool, unexposed strips and dividers (:attr:`PhantomSpec.edge_strip`,
            :attr:`PhantomSpec.divider`; disjoint from ``body_mask``; all False by default).
        label: 1 iff an anomaly was drawn.
        anomaly: ``None``, ``"fracture"``, ``"implant"`` or ``"lesion"``.
        patient_id: e.g. ``"patient00001"``.
        body_part: e.g. ``"XR_WRIST"``.
        study: e.g. ``"study1"`` (MURA folder name without the ``_positive``/``_negative`` suffix,
            as in :mod:`salad_med.data.manifests`).
        laterality: ``"L"`` or ``"R"`` (the marker letter).
        pixel_spacing: (row, column) spacing in mm.
        window: (center, width) in stored units covering the body part.
        seed: the seed it was drawn with.
        spec: the spec it was drawn from.
    """

    image: np.ndarray
    bits_stored: int
    photometric: str
    carrier_polygon: np.ndarray | None
    carrier_mask: np.ndarray
    body_mask: np.ndarray
    bone_mask: np.ndarray
    anomaly_mask: np.ndarray
    marker_mask: np.ndarray
    label: int
    anomaly: str | None
    patient_id: str
    body_part: str
    study: str
    laterality: str
    pixel_spacing: tuple[float, float]
    window: tuple[float, float]
    seed: int
    spec: PhantomSpec = field(repr=False)
    strip_mask: np.ndarray | None = field(default=None, repr=False)

    @property
    def inverted(self) -> bool:
        """True for ``MONOCHROME1`` (stored bone dark)."""
        return self.photometric == "MONOCHROME1"

    def display(self) -> np.ndarray:
        """(H, W) float32 in [0, 1], bone bright (MONOCHROME1 undone, full bit range)."""
        img = self.image.astype(np.float32) / float(2**self.bits_stored - 1)
        return 1.0 - img if self.inverted else img


def random_spec(rng: np.random.Generator, **overrides) -> PhantomSpec:
    """Draw a varied :class:`PhantomSpec`; keyword ``overrides`` fix fields.

    Defaults: body part uniform over :data:`BODY_PARTS`; carrier bright 55 %, dark 30 %, none 15 %;
    rotation 0 (40 %) or uniform in [-15, 15]; out of frame 25 %; anomaly none 50 %, else uniform;
    MONOCHROME1 30 %; bits 8/12/16 equally; markers 85 %; noise in [0.005, 0.03].

    Args:
        rng: numpy Generator (consumed the same way whatever the overrides, so results are stable).
        **overrides: any :class:`PhantomSpec` field.

    Raises:
        ValueError: unknown override name or invalid value.
    """
    names = {f.name for f in dataclasses.fields(PhantomSpec)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        msg = f"random_spec: unknown PhantomSpec field(s) {unknown}; known: {sorted(names)}"
        raise ValueError(msg)
    u = rng.random(8)
    carrier = "bright" if u[1] < 0.55 else "dark" if u[1] < 0.85 else None
    anomaly_draw = rng.integers(len(ANOMALIES))
    drawn = {
        "body_part": BODY_PARTS[int(rng.integers(len(BODY_PARTS)))],
        "carrier": carrier,
        "carrier_rotation": 0.0 if u[2] < 0.4 else float(rng.uniform(-15.0, 15.0)),
        "carrier_out_of_frame": bool(u[3] < 0.25),
        "anomaly": None if u[4] < 0.5 else ANOMALIES[int(anomaly_draw)],
        "monochrome1": bool(u[5] < 0.3),
        "bits_stored": (8, 12, 16)[int(rng.integers(3))],
        "markers": bool(u[6] < 0.85),
        "noise": float(0.005 + 0.025 * u[7]),
    }
    drawn.update(overrides)
    return PhantomSpec(**drawn)


# ----------------------------------------------------------------------------------------------
# Geometry helpers (vectorised on bounding-box windows)
# ----------------------------------------------------------------------------------------------
def _rot(deg: float) -> np.ndarray:
    """2x2 rotation acting on (x, y) column vectors; positive = counter-clockwise as displayed."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    # image y grows downwards, so a displayed counter-clockwise turn is (x, y) -> (c x + s y, -s x + c y)
    return np.array([[c, s], [-s, c]])


def _window(shape: tuple[int, int], xs: Sequence[float], ys: Sequence[float], pad: float):
    """Slices (rows, cols) of the frame covering the points +- pad, and the ogrid coordinates."""
    h, w = shape
    x0 = max(int(math.floor(min(xs) - pad)), 0)
    x1 = min(int(math.ceil(max(xs) + pad)) + 1, w)
    y0 = max(int(math.floor(min(ys) - pad)), 0)
    y1 = min(int(math.ceil(max(ys) + pad)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]
    xx = np.arange(x0, x1, dtype=np.float32)[None, :]
    return (slice(y0, y1), slice(x0, x1)), xx, yy


def _segment_coords(xx, yy, p0: np.ndarray, p1: np.ndarray):
    """Distance to segment p0-p1, position along it (t in [0, 1], unclipped s in px) and signed offset."""
    v = p1 - p0
    length = float(math.hypot(v[0], v[1]))
    if length < 1e-6:
        dx, dy = xx - p0[0], yy - p0[1]
        d = np.sqrt(dx * dx + dy * dy)
        zero = np.zeros_like(d)
        return d, zero, zero, zero, 0.0
    ux, uy = v[0] / length, v[1] / length
    rx, ry = xx - p0[0], yy - p0[1]
    s = rx * ux + ry * uy  # along the axis (px)
    n = -rx * uy + ry * ux  # signed perpendicular offset (px)
    t = np.clip(s / length, 0.0, 1.0)
    sc = t * length
    d = np.sqrt((s - sc) ** 2 + n * n)
    return d, t, s, n, length


# ----------------------------------------------------------------------------------------------
# Body-part templates: normalised coordinates, x along the limb in [-1, 1], y across in [-1, 1];
# radii in units of the short half-size. Soft: (x0, y0, x1, y1, r). Bones: (x0, y0, x1, y1, R, cortex).
# ----------------------------------------------------------------------------------------------
def _polyline(points, r, cortex=None):
    """Consecutive capsules along ``points`` (soft if ``cortex`` is None, else bone)."""
    out = []
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=False):
        out.append((x0, y0, x1, y1, r) if cortex is None else (x0, y0, x1, y1, r, cortex, 1.0))
    return out


def _long_bone(points, r, cortex=0.33, flare=1.3, ends=(True, True)):
    """A long bone: a shaft polyline plus wider epiphyses (round blobs) at its ends."""
    out = _polyline(points, r, cortex)
    for use, (px, py), (qx, qy) in ((ends[0], points[0], points[1]), (ends[1], points[-1], points[-2])):
        if use:
            dx, dy = qx - px, qy - py
            norm = math.hypot(dx, dy) or 1.0
            cx, cy = px + 0.03 * dx / norm, py + 0.03 * dy / norm
            out.append((cx, cy, cx, cy, r * flare, cortex * 0.6, 0.9))
    return out


def _template(body_part: str, rng: np.random.Generator):
    """Soft-tissue and bone capsules of one body part (with random proportions and bends).

    Returns:
        ``soft``: list of ``(x0, y0, x1, y1, r)``; ``bones``: list of ``(x0, y0, x1, y1, R, cortex,
        density)``. Coordinates: x along the limb in [-1, 1], y across in [-1, 1]; radii in units
        of the short half-size of the box; cortex = cortical thickness / R.
    """
    j = lambda scale=0.03: float(rng.uniform(-scale, scale))  # noqa: E731
    soft: list[tuple] = []
    bones: list[tuple] = []
    if body_part == "XR_FOREARM":
        bow = j(0.08)
        soft += _polyline([(-0.98, 0), (0.0, bow), (0.98, 0)], 0.42 + j())
        soft += [(-0.9, 0.02, -0.3, 0.02, 0.47 + j())]
        bones += _long_bone([(-0.9, 0.15), (0.0, 0.15 + bow), (0.88, 0.17)], 0.1 + j(0.01), 0.32)
        bones += _long_bone([(-0.9, -0.13), (0.0, -0.12 + bow), (0.88, -0.13)], 0.09 + j(0.01), 0.32)
    elif body_part == "XR_HUMERUS":
        soft += _polyline([(-0.98, 0.0), (0.0, j(0.06)), (0.9, 0.05)], 0.55 + j())
        bones += _polyline([(-0.72, 0.0), (0.0, j(0.05)), (0.62, 0.04)], 0.15 + j(0.01), 0.35)
        bones += [(0.76, 0.05, 0.76, 0.05, 0.27, 0.16, 0.9)]  # humeral head
        bones += [(-0.8, 0.12, -0.8, 0.12, 0.13, 0.25, 0.9), (-0.8, -0.12, -0.8, -0.12, 0.13, 0.25, 0.9)]
    elif body_part == "XR_ELBOW":
        ang = math.radians(rng.uniform(15, 50))
        ex, ey = 0.05, -0.1
        fx, fy = ex + 1.0 * math.cos(ang), ey + 1.0 * math.sin(ang)
        soft += [(-0.98, -0.35, ex, ey, 0.42 + j()), (ex, ey, fx, fy, 0.38 + j())]
        bones += [(-0.95, -0.33, ex - 0.12, ey - 0.03, 0.14 + j(0.01), 0.33, 1.0)]  # humerus
        bones += [(ex - 0.05, ey - 0.06, ex - 0.05, ey + 0.04, 0.2, 0.2, 0.9)]  # condyles
        nx, ny = -math.sin(ang), math.cos(ang)
        for off, rad in ((0.1, 0.09), (-0.09, 0.1)):  # radius, ulna
            bones += _long_bone([(ex + 0.2 * math.cos(ang) + off * nx, ey + 0.2 * math.sin(ang) + off * ny),
                                 (fx - 0.05 * math.cos(ang) + off * nx, fy - 0.05 * math.sin(ang) + off * ny)],
                                rad + j(0.01), 0.32, ends=(True, False))
    elif body_part == "XR_WRIST":
        soft += [(-0.98, 0.0, 0.1, 0.0, 0.4 + j()), (0.15, 0.0, 0.75, 0.05, 0.5 + j())]
        bones += _long_bone([(-0.95, 0.14), (-0.02, 0.16)], 0.11 + j(0.01), 0.32, ends=(False, True))
        bones += _long_bone([(-0.95, -0.14), (-0.04, -0.15)], 0.09, 0.32, ends=(False, True))
        for cx, cy in ((0.12, -0.2), (0.12, 0.0), (0.12, 0.2), (0.28, -0.22), (0.28, -0.02), (0.28, 0.18)):
            bones += [(cx + j(0.02), cy + j(0.02), cx, cy, 0.085, 0.3, 0.85)]
        for k, y in enumerate((-0.3, -0.1, 0.1, 0.3)):
            bones += _long_bone([(0.42, y * 0.9), (0.8 + 0.03 * (k % 2), y * 1.1)], 0.055, 0.35, flare=1.25)
    elif body_part == "XR_HAND":
        soft += [(-0.95, 0.0, -0.35, 0.0, 0.38 + j()), (-0.4, 0.0, 0.15, 0.0, 0.55 + j())]
        spread = 1.0 + j(0.1)
        for k, y in enumerate((-0.42, -0.14, 0.14, 0.4)):
            tip = 0.88 + 0.06 * (k in (1, 2))
            y1 = y * 1.35 * spread
            soft += [(0.1, y, tip, y1, 0.11)]
            bones += _long_bone([(-0.4, y * 0.55), (0.06, y * 0.95)], 0.055, 0.35, flare=1.25)  # metacarpal
            xs = np.linspace(0.14, tip - 0.03, 4)
            for a, b in zip(xs[:-1], xs[1:], strict=False):  # phalanges with joint gaps
                ya, yb = y + (y1 - y) * (a - 0.1) / (tip - 0.1), y + (y1 - y) * (b - 0.1) / (tip - 0.1)
                bones += _long_bone([(a + 0.025, ya), (b - 0.025, yb)], 0.045, 0.35, flare=1.2)
        soft += [(-0.35, 0.45, 0.25, 0.82, 0.13)]  # thumb
        bones += _long_bone([(-0.3, 0.42), (-0.05, 0.6)], 0.055, 0.35, flare=1.2)
        bones += _long_bone([(0.0, 0.63), (0.2, 0.78)], 0.05, 0.35, flare=1.2)
        for cx, cy in ((-0.55, -0.2), (-0.55, 0.0), (-0.55, 0.2), (-0.45, -0.1), (-0.45, 0.1)):
            bones += [(cx, cy, cx + j(0.02), cy + j(0.02), 0.075, 0.3, 0.85)]
        bones += _long_bone([(-0.95, 0.14), (-0.7, 0.15)], 0.1, 0.32, ends=(False, True))
        bones += _long_bone([(-0.95, -0.14), (-0.7, -0.14)], 0.085, 0.32, ends=(False, True))
    elif body_part == "XR_FINGER":
        bend = j(0.15)
        soft += _polyline([(-0.98, 0.0), (0.0, 0.0), (0.95, bend)], 0.32 + j())
        pts = [(-0.95, 0.0), (-0.35, 0.0), (0.15, bend * 0.2), (0.55, bend * 0.6), (0.88, bend * 0.93)]
        for (a, ya), (b, yb) in zip(pts[:-1], pts[1:], strict=False):
            bones += _long_bone([(a + 0.04, ya), (b - 0.04, yb)], 0.13 + j(0.01), 0.33, flare=1.25)
    elif body_part == "XR_SHOULDER":
        soft += [(-0.98, 0.2, 0.2, 0.1, 0.55 + j()), (0.3, -0.15, 0.75, -0.05, 0.75)]
        bones += _long_bone([(-0.92, 0.2), (0.05, 0.1)], 0.16 + j(0.01), 0.35, ends=(False, False))
        bones += [(0.22, 0.08, 0.22, 0.08, 0.3, 0.15, 0.9)]  # humeral head
        bones += [(0.53, -0.1, 0.56, 0.3, 0.08, 0.35, 0.9)]  # glenoid
        bones += [(0.62, 0.05, 0.85, -0.5, 0.25, 0.2, 0.45)]  # scapular body (thin, faint)
        bones += [(0.3, -0.5, 0.9, -0.62, 0.08, 0.35, 0.9)]  # clavicle
    else:  # pragma: no cover - validated by PhantomSpec
        msg = f"unknown body part {body_part!r}"
        raise ValueError(msg)
    return soft, bones


# ----------------------------------------------------------------------------------------------
# 5x7 bitmap glyphs for markers
# ----------------------------------------------------------------------------------------------
_GLYPHS = {
    "L": ["10000", "10000", "10000", "10000", "10000", "10000", "11111"],
    "R": ["11110", "10001", "10001", "11110", "10100", "10010", "10001"],
    "A": ["01110", "10001", "10001", "11111", "10001", "10001", "10001"],
    "P": ["11110", "10001", "10001", "11110", "10000", "10000", "10000"],
    "T": ["11111", "00100", "00100", "00100", "00100", "00100", "00100"],
    "X": ["10001", "01010", "00100", "00100", "00100", "01010", "10001"],
    "0": ["01110", "10001", "10011", "10101", "11001", "10001", "01110"],
    "1": ["00100", "01100", "00100", "00100", "00100", "00100", "01110"],
    "2": ["01110", "10001", "00001", "00110", "01000", "10000", "11111"],
    "3": ["11110", "00001", "00001", "01110", "00001", "00001", "11110"],
    "4": ["00010", "00110", "01010", "10010", "11111", "00010", "00010"],
    "5": ["11111", "10000", "11110", "00001", "00001", "10001", "01110"],
    "7": ["11111", "00001", "00010", "00100", "01000", "01000", "01000"],
    "9": ["01110", "10001", "10001", "01111", "00001", "00010", "01100"],
}
_GLYPH_ARR = {k: np.array([[c == "1" for c in row] for row in v], dtype=bool) for k, v in _GLYPHS.items()}


def _text_bitmap(text: str, scale: int) -> np.ndarray:
    """Bool bitmap of ``text`` in the 5x7 font, one blank column between glyphs, scaled by ``scale``."""
    cols = []
    for i, ch in enumerate(text):
        if i:
            cols.append(np.zeros((7, 1), dtype=bool))
        cols.append(_GLYPH_ARR[ch])
    bm = np.concatenate(cols, axis=1)
    return np.kron(bm, np.ones((scale, scale), dtype=bool))


def _place(rng, free: np.ndarray, region: np.ndarray | None, hh: int, ww: int, pad: int = 0,
           tries: int = 60):
    """Top-left (row, col) of an hh x ww window that is all ``free`` and, padded by ``pad`` px, all
    ``region`` (when given); None if ``tries`` random positions fail."""
    h, w = free.shape
    if hh + 2 > h or ww + 2 > w:
        return None
    for _ in range(tries):
        r = int(rng.integers(1, h - hh))
        c = int(rng.integers(1, w - ww))
        if not free[r: r + hh, c: c + ww].all():
            continue
        if region is None or region[max(r - pad, 0): r + hh + pad, max(c - pad, 0): c + ww + pad].all():
            return r, c
    return None


def _convex_polygon_mask(shape: tuple[int, int], poly: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixel centres (integer x, y) inside the convex polygon ``poly`` (N, 2) ``(x, y)``.

    Vectorised half-plane tests on the polygon's bounding box (much faster than a scan-line fill).
    """
    mask = np.zeros(shape, dtype=bool)
    win = _window(shape, poly[:, 0], poly[:, 1], 0.0)
    if win is None:
        return mask
    sl, xx, yy = win
    signed_area = 0.5 * float(np.sum(poly[:, 0] * np.roll(poly[:, 1], -1) - np.roll(poly[:, 0], -1) * poly[:, 1]))
    orient = 1.0 if signed_area >= 0 else -1.0
    inside = np.ones((yy.shape[0], xx.shape[1]), dtype=bool)
    for (x0, y0), (x1, y1) in zip(poly, np.roll(poly, -1, axis=0), strict=True):
        cross = (x1 - x0) * (yy - y0) - (y1 - y0) * (xx - x0)
        inside &= orient * cross >= 0
    mask[sl] = inside
    return mask


def _blur3(img: np.ndarray) -> np.ndarray:
    """3x3 binomial blur (edge-replicated), float32."""
    p = np.pad(img, 1, mode="edge")
    v = p[:-2] * 0.25 + p[1:-1] * 0.5 + p[2:] * 0.25
    return v[:, :-2] * 0.25 + v[:, 1:-1] * 0.5 + v[:, 2:] * 0.25


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Square (Chebyshev) dilation by ``radius`` px via running maxima (fast, no scipy)."""
    out = mask.copy()
    for _ in range(2):  # rows then columns
        acc = out.copy()
        for k in range(1, radius + 1):
            acc[k:] |= out[:-k]
            acc[:-k] |= out[k:]
        out = acc.T.copy()
    return out


# ----------------------------------------------------------------------------------------------
# make_phantom
# ----------------------------------------------------------------------------------------------
def _fit_scale(c0: np.ndarray, q: np.ndarray, r: np.ndarray, constraints) -> float:
    """Largest k <= 1 such that every disc c0 + k q_i (radius k r_i) satisfies lo <= n.x <= hi."""
    k = 1.0
    for n, lo, hi in constraints:
        proj = q @ n
        c = float(c0 @ n)
        up = proj + r
        dn = r - proj
        if (up > 0).any():
            k = min(k, float(np.min((hi - c) / up[up > 0])))
        if (dn > 0).any():
            k = min(k, float(np.min((c - lo) / dn[dn > 0])))
    return max(k, 0.05)


@dataclass
class _Frame:
    """Where the body part goes: a centre, unit axes (u = long) and half sizes, in image (x, y)."""

    center: np.ndarray
    u: np.ndarray
    v: np.ndarray
    hu: float
    hv: float


@dataclass
class _Bone:
    """One bone capsule in image pixels: axis p0 -> p1, outer radius, cortex fraction, density."""

    p0: np.ndarray
    p1: np.ndarray
    r: float
    cortex: float
    density: float

    @property
    def length(self) -> float:
        return float(math.hypot(*(self.p1 - self.p0)))


def _carrier_geometry(spec: PhantomSpec, rng: np.random.Generator) -> tuple[np.ndarray, _Frame]:
    """Carrier polygon (4, 2) ``(x, y)`` and its frame (long axis first)."""
    h, w = spec.height, spec.width
    rot = _rot(spec.carrier_rotation)
    lo_f, hi_f = (0.8, 0.98) if spec.carrier_out_of_frame else (0.68, 0.86)
    ax = 0.5 * w * rng.uniform(lo_f, hi_f)  # half size along the (unrotated) x axis
    ay = 0.5 * h * rng.uniform(lo_f, hi_f)
    cth = abs(math.cos(math.radians(spec.carrier_rotation)))
    sth = abs(math.sin(math.radians(spec.carrier_rotation)))
    ext_x, ext_y = ax * cth + ay * sth, ax * sth + ay * cth  # half extents of the rotated rectangle
    cx, cy = (w - 1) / 2, (h - 1) / 2
    if not spec.carrier_out_of_frame:  # shrink so that the rotated carrier stays inside the frame
        k = min(0.47 * w / ext_x, 0.47 * h / ext_y, 1.0)
        ax, ay, ext_x, ext_y = ax * k, ay * k, ext_x * k, ext_y * k
        slack_x, slack_y = max(0.5 * w - 2 - ext_x, 0.0), max(0.5 * h - 2 - ext_y, 0.0)
        center = np.array([cx + rng.uniform(-slack_x, slack_x), cy + rng.uniform(-slack_y, slack_y)])
    else:  # push the carrier past one or two borders (0 left, 1 right, 2 top, 3 bottom)
        center = np.array([cx, cy])
        for side in rng.permutation(4)[: 1 + int(rng.random() < 0.4)]:
            over = rng.uniform(0.06, 0.2)
            if side == 0:
                center[0] = ext_x - over * w
            elif side == 1:
                center[0] = (w - 1) + over * w - ext_x
            elif side == 2:
                center[1] = ext_y - over * h
            else:
                center[1] = (h - 1) + over * h - ext_y
    corners = np.array([[-ax, -ay], [ax, -ay], [ax, ay], [-ax, ay]])
    poly = corners @ rot.T + center
    ex, ey = rot[:, 0], rot[:, 1]  # images of the x and y unit vectors
    frame = _Frame(center, ey, ex, ay, ax) if ay >= ax else _Frame(center, ex, ey, ax, ay)
    return poly, frame


def _layout_body(spec: PhantomSpec, rng: np.random.Generator, frame: _Frame, visible: np.ndarray,
                 in_carrier: bool) -> tuple[list[tuple[np.ndarray, np.ndarray, float]], list[_Bone], float]:
    """Place the body-part template in the frame, scaled to fit inside the carrier and the image.

    Returns:
        soft capsules ``(p0, p1, r)`` and bones in image pixels, and the margin used (px).
    """
    h, w = spec.height, spec.width
    margin = max(2.0, 0.035 * min(h, w))
    box_u, box_v = frame.hu - margin, frame.hv - margin
    soft_t, bone_t = _template(spec.body_part, rng)
    flip_u = -1.0 if rng.random() < 0.5 else 1.0
    flip_v = -1.0 if rng.random() < 0.5 else 1.0
    limb_rot = _rot(rng.uniform(-8, 8))
    scale = rng.uniform(0.85, 1.0)
    basis = np.stack([frame.u, frame.v], axis=1)  # local (u, v) -> image (x, y)

    def to_image_offset(x, y):
        return basis @ (limb_rot @ np.array([flip_u * x * box_u, flip_v * y * box_v]) * scale)

    caps = [(to_image_offset(x0, y0), to_image_offset(x1, y1), r * box_v * scale, None)
            for x0, y0, x1, y1, r in soft_t]
    caps += [(to_image_offset(x0, y0), to_image_offset(x1, y1), r * box_v * scale, (cort, dens))
             for x0, y0, x1, y1, r, cort, dens in bone_t]
    # centre of the visible part of the (convex) carrier: inside both the carrier and the frame
    ys_v, xs_v = np.nonzero(visible[::4, ::4])
    c0 = np.array([xs_v.mean() * 4, ys_v.mean() * 4]) if xs_v.size else frame.center.copy()
    q = np.array([p for c in caps for p in (c[0], c[1])])
    rad = np.repeat([c[2] for c in caps], 2)
    constraints = [(np.array([1.0, 0.0]), margin, w - 1 - margin), (np.array([0.0, 1.0]), margin, h - 1 - margin)]
    if in_carrier:
        cu, cv = float(frame.center @ frame.u), float(frame.center @ frame.v)
        constraints += [(frame.u, cu - box_u, cu + box_u), (frame.v, cv - box_v, cv + box_v)]
    k = _fit_scale(c0, q, rad, constraints)
    soft, bones = [], []
    for a, b, r, bone in caps:
        p0, p1 = c0 + k * a, c0 + k * b
        if bone is None:
            soft.append((p0, p1, max(k * r, 1.0)))
        else:
            bones.append(_Bone(p0, p1, max(k * r, 1.2), bone[0], bone[1]))
    return soft, bones, margin


def _render_soft(shape, soft) -> tuple[np.ndarray, np.ndarray]:
    """Union mask (H, W) bool and normalised cylindrical thickness (H, W) float32 of soft tissue."""
    mask = np.zeros(shape, dtype=bool)
    thick = np.zeros(shape, dtype=np.float32)
    for p0, p1, r in soft:
        win = _window(shape, (p0[0], p1[0]), (p0[1], p1[1]), r + 1)
        if win is None:
            continue
        sl, wx, wy = win
        d = _segment_coords(wx, wy, p0, p1)[0]
        mask[sl] |= d < r
        np.maximum(thick[sl], np.sqrt(np.clip(1.0 - (d / r) ** 2, 0.0, 1.0)), out=thick[sl])
    return mask, thick


def _render_bone(shape, bone: _Bone, amp: float, med_amp: float):
    """Projected cylindrical shell of one bone on its window.

    Returns:
        ``(slices, value, inside, s, n)`` or None when off-frame: value = bright cortex + faint
        medulla; ``s`` / ``n`` are along-axis / signed perpendicular coordinates (px) on the window.
    """
    win = _window(shape, (bone.p0[0], bone.p1[0]), (bone.p0[1], bone.p1[1]), bone.r + 1)
    if win is None:
        return None
    sl, wx, wy = win
    d, _, s, n, _ = _segment_coords(wx, wy, bone.p0, bone.p1)
    r, ri = bone.r, bone.r * (1.0 - bone.cortex)
    outer = np.sqrt(np.clip(r * r - d * d, 0.0, None))
    inner = np.sqrt(np.clip(ri * ri - d * d, 0.0, None))
    shell = (outer - inner) / (r * math.sqrt(1 - (1 - bone.cortex) ** 2))  # 1 at the inner edge
    val = bone.density * (amp * 0.85 * np.clip(shell, 0, 1) + med_amp * inner / r)
    return sl, val.astype(np.float32), d < r, s, n


def _bone_defect(kind: str, bone: _Bone, s, n, inside, par: np.ndarray, scale: float = 1.0):
    """Multiplicative factor and mask of a fracture gap or a lytic lesion on one bone window.

    ``scale`` multiplies the gap half-width (fracture) or the ellipse radii (lesion).
    """
    s0 = (0.3 + 0.4 * par[0]) * bone.length
    if kind == "fracture":  # a line across the bone, +-35 degrees off perpendicular
        phi = math.radians(-35 + 70 * par[1])
        dist = np.abs((s - s0) * math.cos(phi) + n * math.sin(phi))
        gap = max(0.6, bone.r * (0.12 + 0.12 * par[2])) * scale
        return np.clip(dist - gap, 0.0, 1.0), (dist <= gap + 0.5) & inside
    ra = max(1.5, bone.r * (0.55 + 0.25 * par[1])) * scale  # across
    rb = max(2.0, bone.r * (0.9 + 1.0 * par[2])) * scale  # along
    off = (par[3] - 0.5) * 0.4 * bone.r
    e = ((s - s0) / rb) ** 2 + ((n - off) / ra) ** 2
    depth = 0.7 + 0.2 * par[4]
    return 1.0 - depth * np.clip(1.0 - e, 0.0, 1.0) ** 0.25, (e < 0.8) & inside


def _implant_mask(shape, bone: _Bone, par: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """(H, W) bool of a plate with 2-4 screws on the cortex, or a single lag screw / nail.

    ``scale`` multiplies the plate/nail length (capped by the bone length) and thickness and the screw size.
    """
    length = bone.length
    axis = (bone.p1 - bone.p0) / max(length, 1e-6)
    perp = np.array([-axis[1], axis[0]])
    centre = bone.p0 + axis * (0.3 + 0.4 * par[0]) * length
    r = bone.r
    rects = []  # (centre, half-length direction, half-width direction, half length, half width)
    if par[1] < 0.6:
        half_len = min(0.45 * length, r * (2.5 + 2 * par[2]) * scale)
        th = max(1.0, 0.35 * r) * scale
        side = 1.0 if par[3] < 0.5 else -1.0
        pc = centre + perp * side * (r + 0.3 * th)
        rects.append((pc, axis, perp, half_len, th / 2 + 0.5))
        for s_off in np.linspace(-0.75, 0.75, 2 + int(par[4] * 3)) * half_len:
            rects.append((pc + axis * s_off - perp * side * r * 0.9, perp, axis, r * 1.15,
                          max(0.7, 0.12 * r) * scale))
    else:
        dirv = perp if par[2] < 0.5 else axis
        half_len = r * 1.2 if par[2] < 0.5 else min(0.4 * length, r * 4 * scale)
        rects.append((centre, dirv, np.array([-dirv[1], dirv[0]]), half_len, max(0.8, 0.18 * r) * scale))
    mask = np.zeros(shape, dtype=bool)
    for cen, a_dir, b_dir, hl, hw in rects:
        corners = np.array([cen + a_dir * sa * hl + b_dir * sb * hw for sa, sb in ((-1, -1), (1, -1), (1, 1), (-1, 1))])
        mask |= _convex_polygon_mask(shape, corners)
    return mask


def _place_touching(rng, body_mask: np.ndarray, taken: np.ndarray, hh: int, ww: int):
    """Top-left (row, col) of an hh x ww window outside the body and ``taken`` that touches the body
    (a body pixel within 1 px of the window); None when there is none."""
    h, w = body_mask.shape
    if hh + 2 > h or ww + 2 > w:
        return None

    def window_counts(m: np.ndarray, a: int, b: int) -> np.ndarray:
        c = np.pad(np.cumsum(np.cumsum(m.astype(np.int32), axis=0), axis=1), ((1, 0), (1, 0)))
        return c[a:, b:] - c[:-a, b:] - c[a:, :-b] + c[:-a, :-b]  # (h - a + 1, w - b + 1)

    inside = window_counts(body_mask | taken, hh, ww) == 0
    near = window_counts(body_mask, hh + 2, ww + 2)[:, :] > 0  # windows grown by 1 px on each side
    ok = inside[1:-1, 1:-1] & near[: inside.shape[0] - 2, : inside.shape[1] - 2]
    rr, cc = np.nonzero(ok)
    if rr.size == 0:
        return None
    k = int(rng.integers(rr.size))
    return int(rr[k]) + 1, int(cc[k]) + 1


def _draw_markers(img, rng, body_mask, carrier_mask, has_carrier: bool, laterality: str, base: float,
                  touching: bool = False):
    """Burn an L/R letter and a text box into ``img`` outside the (dilated) body; return their mask.

    With ``touching`` they are placed against the body's outline instead (still outside it).
    """
    h, w = img.shape
    marker_mask = np.zeros(img.shape, dtype=bool)
    free = ~_dilate(body_mask, max(2, int(0.02 * min(h, w))))
    scale = max(1, round(min(h, w) / 90))
    letter = _text_bitmap(laterality, scale + 1 if scale >= 2 else scale)
    n_chars = int(rng.integers(2, max(2, min(6, (w - 10) // 40)) + 1))
    text = _text_bitmap("".join(rng.choice(list("01234579APTX"), size=n_chars)), max(1, scale // 2))
    pad = max(1, scale)
    box = np.zeros((text.shape[0] + 2 * pad + 2, text.shape[1] + 2 * pad + 2), dtype=bool)
    box[0, :] = box[-1, :] = box[:, 0] = box[:, -1] = True
    boxed_text = box.copy()
    boxed_text[pad + 1: pad + 1 + text.shape[0], pad + 1: pad + 1 + text.shape[1]] |= text
    filled = rng.random() < 0.35  # bright label with dark text, else bright outline and text
    value = rng.uniform(0.88, 1.0)
    gap = max(2, round(0.015 * min(h, w)))  # markers keep clear of the carrier border
    for bitmap, is_box in ((letter, False), (box, True)):
        pos = None
        if touching:
            pos = _place_touching(rng, body_mask, marker_mask, *bitmap.shape)
        elif has_carrier:
            on_carrier = rng.random() < 0.8
            first, second = (carrier_mask, ~carrier_mask) if on_carrier else (~carrier_mask, carrier_mask)
            pos = _place(rng, free, first, *bitmap.shape, pad=gap)
            pos = pos if pos is not None else _place(rng, free, second, *bitmap.shape, pad=gap)
        else:
            pos = _place(rng, free, None, *bitmap.shape)
        if pos is None:
            continue
        sl = (slice(pos[0], pos[0] + bitmap.shape[0]), slice(pos[1], pos[1] + bitmap.shape[1]))
        if is_box and filled:
            img[sl] = value
            img[sl][boxed_text & ~box] = base * 0.5
            marker_mask[sl] = True
        else:
            pattern = boxed_text if is_box else bitmap
            img[sl][pattern] = value
            marker_mask[sl] |= pattern
        free[sl] = False
    return marker_mask


def _edge_strip(shape: tuple[int, int], kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mask and blend weight (H, W) of an unexposed strip along one random side.

    ``"fading"``: full brightness at the frame, fading inwards over ~6 % of the side (weight
    ``(1 - d / width) ** 1.5``, the mask where it is >= 0.25); ``"sliver"``: a flat band of ~2 %.
    """
    h, w = shape
    side = int(rng.integers(4))  # 0 top, 1 bottom, 2 left, 3 right
    across = h if side < 2 else w
    dist = np.arange(across, dtype=np.float32)
    if side in (1, 3):
        dist = dist[::-1]
    width = max(3.0, (0.06 if kind == "fading" else 0.02) * across * rng.uniform(0.9, 1.1))
    if kind == "fading":
        alpha = np.clip(1.0 - dist / width, 0.0, 1.0) ** 1.5
        band = alpha >= 0.25
    else:
        band = dist < width
        alpha = band.astype(np.float32)
    if side < 2:
        alpha, band = np.repeat(alpha[:, None], w, axis=1), np.repeat(band[:, None], w, axis=1)
    else:
        alpha, band = np.repeat(alpha[None, :], h, axis=0), np.repeat(band[None, :], h, axis=0)
    return band, alpha.astype(np.float32)


def _double_exposure(spec: PhantomSpec, seed: int) -> Phantom:
    """Two exposures side by side (each a phantom of half the width, its own background) separated by a
    white unexposed divider with grey penumbra strips (``strip_mask``)."""
    rng = np.random.default_rng([int(seed), 0xD171])
    h, w = int(spec.height), int(spec.width)
    core = max(3, round(0.025 * w))
    strip = max(2, round(0.03 * w))
    half = (w - core - 2 * strip) // 2
    sub = dataclasses.replace(spec, divider=False, carrier=None, width=half, bits_stored=16, monochrome1=False)
    left, right = make_phantom(sub, seed), make_phantom(dataclasses.replace(sub, body_part=spec.body_part), seed + 7919)
    grey = float(rng.uniform(0.15, 0.22))
    mid = np.concatenate([np.full((h, strip), grey, np.float32), np.full((h, core), 0.97, np.float32),
                          np.full((h, strip), grey, np.float32)], axis=1)
    pad_w = w - 2 * half - mid.shape[1]
    img = np.concatenate([left.display(), mid, right.display(), np.full((h, pad_w), grey, np.float32)], axis=1)
    img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(0.004)

    def join(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a, np.zeros((h, mid.shape[1]), bool), b, np.zeros((h, pad_w), bool)], axis=1)

    strip_mask = join(np.zeros((h, half), bool), np.zeros((h, half), bool))
    strip_mask[:, half: half + mid.shape[1]] = True
    strip_mask[:, w - pad_w:] = True
    bits = int(spec.bits_stored)
    maxv = float(2**bits - 1)
    stored = np.clip(np.rint(np.clip(img, 0.0, 1.0) * maxv), 0, maxv)
    if spec.monochrome1:
        stored = maxv - stored
    body = join(left.body_mask, right.body_mask)
    return Phantom(
        image=stored.astype(np.uint8 if bits == 8 else np.uint16), bits_stored=bits,
        photometric=_PHOTOMETRIC[0 if spec.monochrome1 else 1], carrier_polygon=None,
        carrier_mask=np.zeros((h, w), bool), body_mask=body, bone_mask=join(left.bone_mask, right.bone_mask),
        anomaly_mask=join(left.anomaly_mask, right.anomaly_mask), marker_mask=join(left.marker_mask, right.marker_mask),
        label=max(left.label, right.label), anomaly=spec.anomaly, patient_id=left.patient_id, body_part=spec.body_part,
        study=left.study, laterality=left.laterality, pixel_spacing=left.pixel_spacing, window=(maxv / 2, maxv),
        seed=int(seed), spec=spec, strip_mask=strip_mask,
    )


def make_phantom(spec: PhantomSpec, seed: int) -> Phantom:
    """Draw one synthetic radiograph with ground truth.

    Args:
        spec: what to draw (size, body part, carrier, anomaly, polarity, bits, markers, noise).
        seed: drives every remaining random choice; same spec + seed -> identical bytes.

    Returns:
        :class:`Phantom` with ``image`` (H, W) ``uint8``/``uint16`` as stored and (H, W) bool masks.
    """
    if spec.divider:
        return _double_exposure(spec, seed)
    rng = np.random.default_rng([int(seed), 0x5A1AD])
    h, w = int(spec.height), int(spec.width)
    shape = (h, w)
    yy = np.arange(h, dtype=np.float32)[:, None]
    xx = np.arange(w, dtype=np.float32)[None, :]

    # --- 1. background: dark, linear gradient + vignette (display units, bone bright) ----------
    has_carrier = spec.carrier is not None
    bg_level = rng.uniform(0.2, 0.3) if spec.carrier == "dark" else rng.uniform(0.06, 0.14)
    g_ang, g_amp = rng.uniform(0, 2 * math.pi), rng.uniform(0.005, 0.02)  # mild: the exterior stays uniform
    img = (bg_level + (xx / w - 0.5) * math.cos(g_ang) * g_amp + (yy / h - 0.5) * math.sin(g_ang) * g_amp
           + ((xx / w - 0.5) ** 2 + (yy / h - 0.5) ** 2) * rng.uniform(-0.04, 0.0)).astype(np.float32)

    # --- 2. carrier: uniform field (slight heel effect) with straight borders -------------------
    if has_carrier:
        polygon, frame = _carrier_geometry(spec, rng)
        carrier_mask = _convex_polygon_mask(shape, polygon)
        base = rng.uniform(0.28, 0.38) if spec.carrier == "bright" else rng.uniform(0.03, 0.07)
        heel = ((xx - frame.center[0]) * frame.u[0] + (yy - frame.center[1]) * frame.u[1]) / max(frame.hu, 1.0)
        img = np.where(carrier_mask, base + rng.uniform(-0.015, 0.015) * heel, img).astype(np.float32)
        visible = carrier_mask
    else:
        polygon, carrier_mask, base = None, np.zeros(shape, dtype=bool), bg_level
        rot = _rot(rng.uniform(-15, 15))
        centre = np.array([(w - 1) / 2, (h - 1) / 2])
        frame = (_Frame(centre, rot[:, 1], rot[:, 0], 0.45 * h, 0.45 * w) if h >= w
                 else _Frame(centre, rot[:, 0], rot[:, 1], 0.45 * w, 0.45 * h))
        visible = np.ones(shape, dtype=bool)

    # --- 3. body part: soft tissue plateau + bones (cortical shells) ---------------------------
    soft, bones, _ = _layout_body(spec, rng, frame, visible, has_carrier)
    soft_mask, soft_thick = _render_soft(shape, soft)
    soft_amp = rng.uniform(0.2, 0.28)
    bone_amp = max(0.93 - base - soft_amp, 0.3)
    pieces = [_render_bone(shape, b, bone_amp, rng.uniform(0.15, 0.3)) for b in bones]
    bone_mask = np.zeros(shape, dtype=bool)
    for piece in pieces:
        if piece is not None:
            bone_mask[piece[0]] |= piece[2]

    # --- 4. anomaly on one long bone (retry other bones if hidden by overlaps) -----------------
    anomaly_mask = np.zeros(shape, dtype=bool)
    implant_mask = np.zeros(shape, dtype=bool)
    par = rng.random(5)
    if spec.anomaly is not None:
        long_bones = [i for i, b in enumerate(bones) if b.length > 3 * b.r and pieces[i] is not None]
        pool = long_bones or [i for i, p in enumerate(pieces) if p is not None]
        weights = np.array([max(bones[i].length, 1.0) * bones[i].r for i in pool])
        order = rng.choice(len(pool), size=len(pool), replace=False, p=weights / weights.sum())
        for target in (pool[int(j)] for j in order):
            if spec.anomaly == "implant":
                implant_mask = _implant_mask(shape, bones[target], par, spec.anomaly_scale) & (soft_mask | bone_mask)
                anomaly_mask = implant_mask
            else:
                sl, val, inside, s, n = pieces[target]
                factor, region = _bone_defect(spec.anomaly, bones[target], s, n, inside, par, spec.anomaly_scale)
                others = np.zeros(inside.shape, dtype=bool)
                for i, p in enumerate(pieces):
                    if i != target and p is not None:
                        _overlay(others, sl, p[0], p[2])
                region &= ~others  # where another bone overlaps, the defect is not visible
                if region.any():
                    pieces[target] = (sl, val * factor.astype(np.float32), inside, s, n)
                    anomaly_mask[sl] = region
            if anomaly_mask.any():
                break
    bone_val = np.zeros(shape, dtype=np.float32)
    for piece in pieces:
        if piece is not None:
            np.maximum(bone_val[piece[0]], piece[1], out=bone_val[piece[0]])
    # trabecular mottling: low-frequency multiplicative texture on bone
    cell = max(2, min(h, w) // 64)
    tex = rng.standard_normal((h // cell + 2, w // cell + 2), dtype=np.float32)
    tex = _blur3(tex)  # smooth at low resolution; the final blur softens the block edges
    bone_val *= 1.0 + 0.08 * np.repeat(np.repeat(tex, cell, axis=0), cell, axis=1)[:h, :w]

    # --- compose: blur (projection unsharpness), metal, noise ----------------------------------
    if spec.fill_frame:  # a trunk behind the limb fills the frame: background only in the corners
        tr = np.random.default_rng([int(seed), 0x7A0C])
        cx, cy = (w - 1) * tr.uniform(0.45, 0.55), (h - 1) * tr.uniform(0.45, 0.55)
        ax, ay = 0.57 * w * tr.uniform(0.95, 1.05), 0.57 * h * tr.uniform(0.95, 1.05)
        r2 = ((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2
        trunk = r2 < 1.0
        soft_mask = soft_mask | trunk
        soft_thick = np.maximum(soft_thick, np.sqrt(np.clip(1.0 - r2, 0.0, 1.0)).astype(np.float32))
    body_mask = soft_mask | bone_mask | implant_mask
    soft_val = np.where(soft_mask, soft_amp * (0.6 + 0.4 * soft_thick), 0.0).astype(np.float32)
    img = _blur3(img + soft_val + bone_val)
    if implant_mask.any():
        img[implant_mask] = rng.uniform(0.97, 1.0)  # metal saturates, sharp edges
    anomaly_mask &= body_mask
    if spec.noise > 0:
        img += rng.standard_normal(shape, dtype=np.float32) * np.float32(spec.noise)

    # --- 5. markers (burned in after acquisition: sharp, noise-free) ---------------------------
    laterality = "L" if rng.random() < 0.5 else "R"
    marker_mask = (_draw_markers(img, rng, body_mask, carrier_mask, has_carrier, laterality, base,
                                 touching=spec.markers_touching)
                   if spec.markers else np.zeros(shape, dtype=bool))
    strip_mask = np.zeros(shape, dtype=bool)
    if spec.edge_strip is not None:  # an unexposed strip along one side: no anatomy, no marker there
        strip_mask, alpha = _edge_strip(shape, spec.edge_strip, np.random.default_rng([int(seed), 0x5791B]))
        img = img * (1.0 - alpha) + np.float32(0.97) * alpha
        for m in (body_mask, bone_mask, anomaly_mask, marker_mask):
            m &= ~strip_mask
    np.clip(img, 0.0, 1.0, out=img)

    # --- 6. store: display [0, 1] -> [lo, hi] integers; MONOCHROME1 stored inverted ------------
    bits = int(spec.bits_stored)
    maxv = float(2**bits - 1)
    lo, hi = (rng.uniform(0, 6), rng.uniform(240, 255)) if bits == 8 else (
        rng.uniform(0, 0.04) * maxv, rng.uniform(0.8, 1.0) * maxv)
    stored = np.clip(np.rint(lo + img * (hi - lo)), 0, maxv)
    if spec.monochrome1:
        stored = maxv - stored
    image = stored.astype(np.uint8 if bits == 8 else np.uint16)
    # VOI window covering the body part, in stored units
    body_vals = img[body_mask] if body_mask.any() else img.ravel()
    s_lo, s_hi = (lo + float(np.percentile(body_vals, q)) * (hi - lo) for q in (1, 99.5))
    if spec.monochrome1:
        s_lo, s_hi = maxv - s_hi, maxv - s_lo
    window = (round((s_lo + s_hi) / 2, 1), round(max(s_hi - s_lo, 1.0), 1))

    label = int(spec.anomaly is not None)
    spacing = round(float(rng.uniform(0.1, 0.2)) * 512 / max(h, w), 4)
    return Phantom(
        image=image, bits_stored=bits, photometric=_PHOTOMETRIC[0 if spec.monochrome1 else 1],
        carrier_polygon=polygon, carrier_mask=carrier_mask, body_mask=body_mask, bone_mask=bone_mask,
        anomaly_mask=anomaly_mask, marker_mask=marker_mask, label=label, anomaly=spec.anomaly,
        patient_id=spec.patient_id or f"patient{int(seed) % 100000:05d}", body_part=spec.body_part,
        study=spec.study or "study1", laterality=laterality,
        pixel_spacing=(spacing, spacing), window=window, seed=int(seed), spec=spec, strip_mask=strip_mask,
    )


def _overlay(dst: np.ndarray, dst_sl, src_sl, src: np.ndarray) -> None:
    """``dst |= src`` where ``dst`` covers window ``dst_sl`` and ``src`` covers ``src_sl`` (same frame)."""
    r0, r1 = max(dst_sl[0].start, src_sl[0].start), min(dst_sl[0].stop, src_sl[0].stop)
    c0, c1 = max(dst_sl[1].start, src_sl[1].start), min(dst_sl[1].stop, src_sl[1].stop)
    if r0 >= r1 or c0 >= c1:
        return
    part = src[r0 - src_sl[0].start: r1 - src_sl[0].start, c0 - src_sl[1].start: c1 - src_sl[1].start]
    dst[r0 - dst_sl[0].start: r1 - dst_sl[0].start, c0 - dst_sl[1].start: c1 - dst_sl[1].start] |= part


# ----------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------
def write_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """Write a (H, W) ``uint8`` (8-bit) or ``uint16`` (16-bit) grayscale PNG atomically.

    Raises:
        ValueError: not a 2-D uint8/uint16 array.
    """
    from preprocessing.atomic import write_png as write_grey_png

    return write_grey_png(image, path, compress_level=6)  # PIL's default level: compact phantom trees


def save_truth(phantom: Phantom, path: str | os.PathLike) -> Path:
    """Save the ground truth of ``phantom`` as a compressed ``.npz`` (atomically).

    Keys: ``carrier_mask``, ``body_mask``, ``bone_mask``, ``anomaly_mask``, ``marker_mask`` (H, W)
    bool; ``carrier_polygon`` (4, 2) float (shape (0, 2) without a carrier); ``label`` int;
    ``photometric``, ``anomaly`` ('' when none), ``body_part``, ``patient_id``, ``study`` str.
    """
    poly = phantom.carrier_polygon if phantom.carrier_polygon is not None else np.zeros((0, 2))
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, carrier_mask=phantom.carrier_mask, body_mask=phantom.body_mask,
                bone_mask=phantom.bone_mask, anomaly_mask=phantom.anomaly_mask,
                marker_mask=phantom.marker_mask, carrier_polygon=poly.astype(np.float64),
                label=np.int64(phantom.label), photometric=np.str_(phantom.photometric),
                anomaly=np.str_(phantom.anomaly or ""), body_part=np.str_(phantom.body_part),
                patient_id=np.str_(phantom.patient_id), study=np.str_(phantom.study),
            )
    return Path(path)


def load_truth(path: str | os.PathLike) -> dict:
    """Load a truth ``.npz`` written by :func:`save_truth` into a dict (polygon ``None`` if absent)."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    for k in ("photometric", "anomaly", "body_part", "patient_id", "study"):
        out[k] = str(out[k])
    out["label"] = int(out["label"])
    out["anomaly"] = out["anomaly"] or None
    if out["carrier_polygon"].shape[0] == 0:
        out["carrier_polygon"] = None
    return out


def _truth_row(ph: Phantom, image_id: str) -> dict:
    return {
        "image_id": image_id, "patient_id": ph.patient_id, "body_part": ph.body_part, "study": ph.study,
        "label": ph.label, "anomaly": ph.anomaly or "", "carrier": ph.spec.carrier or "",
        "carrier_rotation": round(float(ph.spec.carrier_rotation), 3),
        "carrier_out_of_frame": bool(ph.spec.carrier_out_of_frame), "photometric": ph.photometric,
        "bits": ph.bits_stored, "height": ph.image.shape[0], "width": ph.image.shape[1],
        "laterality": ph.laterality, "seed": ph.seed,
        "body_fraction": round(float(ph.body_mask.mean()), 5),
    }


def _split_counts(n: int, fraction: float) -> int:
    """How many of ``n`` items get a property of probability ``fraction`` (rounded, kept in [1, n-1])."""
    k = round(n * fraction)
    if 0 < fraction < 1 and n >= 2:
        k = min(max(k, 1), n - 1)
    return int(k)


def write_mura_tree(
    root: str | os.PathLike,
    n_patients: int = 20,
    seed: int = 0,
    body_parts: Sequence[str] = BODY_PARTS,
    abnormal_fraction: float = 0.3,
    size: tuple[int, int] = (512, 416),
    images_per_study: tuple[int, int] = (1, 3),
    studies_per_patient: tuple[int, int] = (1, 2),
    splits: Sequence[str] = ("train", "valid"),
    valid_fraction: float = 0.25,
    inverted_fraction: float = 0.1,
    bits: int = 8,
    anomaly_scale: float = 1.0,
    spec_overrides: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Write a MURA-v1.1-like PNG tree of phantoms with ground truth.

    Layout (exactly as MURA-v1.1, relative to ``root``)::

        MURA-v1.1/{train,valid}/XR_<BP>/patient<5 digits>/study<N>_<positive|negative>/image<K>.png
        MURA-v1.1/{train,valid}_image_paths.csv      one column, no header: MURA-v1.1/train/.../image1.png
        MURA-v1.1/{train,valid}_labeled_studies.csv  no header: MURA-v1.1/train/.../study1_positive/,1
        truth/<image_id>.npz                         masks + polygon (see save_truth), outside the tree
        truth.csv                                    one row per image (the returned DataFrame)

    Patients are split by patient (``valid_fraction`` of them in the second split). A patient has
    ``studies_per_patient`` studies, possibly on different body parts; study numbers count per
    patient and body part. Exactly ``round(abnormal_fraction * n_studies)`` studies are positive.
    Unlike real MURA (where a positive study may hold normal-looking views), **every image of a
    positive study carries an anomaly**, so image labels equal study labels. About
    ``inverted_fraction`` of the PNGs are stored inverted (bright background, like some MURA images).

    Args:
        root: output folder (created).
        n_patients: number of patients.
        seed: everything is deterministic given the arguments.
        body_parts: body parts to draw from.
        abnormal_fraction: fraction of positive studies.
        size: (H, W) of every image.
        images_per_study: inclusive (min, max) views per study.
        studies_per_patient: inclusive (min, max) studies per patient.
        splits: split folder names (one or two).
        valid_fraction: fraction of patients in ``splits[1]``.
        inverted_fraction: fraction of images stored MONOCHROME1-style (inverted).
        bits: 8 (MURA) or 16 bit PNGs.
        anomaly_scale: :attr:`PhantomSpec.anomaly_scale` of every abnormal image (1 = default size).
        spec_overrides: fixed :class:`PhantomSpec` fields for every image, e.g.
            ``{"carrier": None, "markers": False}`` (``None`` = all drawn at random).

    Returns:
        DataFrame, one row per image: ``image_id, path`` (relative to ``root``), ``source_path``
        (absolute), ``truth_path``, ``split, patient_id`` (``patient00001``), ``body_part``,
        ``study`` (``study1``), ``study_path`` (the study folder as in the labeled-studies CSV), ``label, anomaly,
        carrier, carrier_rotation, carrier_out_of_frame, photometric, bits, height, width, laterality,
        seed, body_fraction``.

    Raises:
        ValueError: bad arguments.
    """
    if n_patients < 1:
        msg = f"write_mura_tree: n_patients must be >= 1, got {n_patients}"
        raise ValueError(msg)
    bad = [b for b in body_parts if b not in BODY_PARTS]
    if bad or not body_parts:
        msg = f"write_mura_tree: body_parts {bad or body_parts} not in {BODY_PARTS}"
        raise ValueError(msg)
    if not 1 <= len(splits) <= 2:
        msg = f"write_mura_tree: splits must name one or two folders, got {splits}"
        raise ValueError(msg)
    if bits not in (8, 16):
        msg = f"write_mura_tree: bits must be 8 or 16, got {bits}"
        raise ValueError(msg)
    root = Path(root)
    mura = root / "MURA-v1.1"
    rng = np.random.default_rng([int(seed), 0x3A7])
    n_valid = _split_counts(n_patients, valid_fraction) if len(splits) == 2 else 0
    patient_split = [splits[0]] * (n_patients - n_valid) + [splits[-1]] * n_valid

    # plan studies: (split, patient, body_part, study_no, n_images)
    plan = []
    for p in range(n_patients):
        n_st = int(rng.integers(studies_per_patient[0], studies_per_patient[1] + 1))
        parts = rng.choice(list(body_parts), size=n_st, replace=True)
        counter: dict[str, int] = {}
        for bp in parts:
            counter[bp] = counter.get(bp, 0) + 1
            n_img = int(rng.integers(images_per_study[0], images_per_study[1] + 1))
            plan.append((patient_split[p], p + 1, str(bp), counter[bp], n_img))
    n_pos = _split_counts(len(plan), abnormal_fraction)
    positive = np.zeros(len(plan), dtype=bool)
    positive[rng.permutation(len(plan))[:n_pos]] = True

    rows, paths_csv, studies_csv = [], {s: [] for s in splits}, {s: [] for s in splits}
    for (split, pnum, bp, sno, n_img), pos in zip(plan, positive, strict=True):
        status = "positive" if pos else "negative"
        pid = f"patient{pnum:05d}"
        study_rel = f"MURA-v1.1/{split}/{bp}/{pid}/study{sno}_{status}/"
        studies_csv[split].append(f"{study_rel},{int(pos)}")
        for k in range(1, n_img + 1):
            img_seed = int(rng.integers(2**31))
            spec = random_spec(
                rng, height=size[0], width=size[1], body_part=bp,
                anomaly=ANOMALIES[int(rng.integers(len(ANOMALIES)))] if pos else None,
                monochrome1=bool(rng.random() < inverted_fraction), bits_stored=bits,
                patient_id=pid, study=f"study{sno}", anomaly_scale=anomaly_scale,
                **dict(spec_overrides or {}),
            )
            ph = make_phantom(spec, img_seed)
            rel = f"{study_rel}image{k}.png"
            image_id = f"{split}_{bp}_{pid}_study{sno}_{status}_image{k}"
            write_png(ph.image, root / rel)
            truth_rel = f"truth/{image_id}.npz"
            save_truth(ph, root / truth_rel)
            paths_csv[split].append(rel)
            row = _truth_row(ph, image_id)
            row.update({"path": rel, "source_path": str((root / rel).resolve()), "truth_path": truth_rel,
                        "split": split, "study_path": study_rel})
            rows.append(row)
    for split in splits:
        atomic_write_text(mura / f"{split}_image_paths.csv", "".join(f"{p}\n" for p in paths_csv[split]))
        atomic_write_text(mura / f"{split}_labeled_studies.csv", "".join(f"{s}\n" for s in studies_csv[split]))
    df = pd.DataFrame(rows)
    front = ["image_id", "path", "source_path", "truth_path", "split", "patient_id", "body_part", "study",
             "study_path", "label", "anomaly"]
    df = df[front + [c for c in df.columns if c not in front]]
    with atomic_path(root / "truth.csv") as tmp:
        df.to_csv(tmp, index=False)
    return df


# ----------------------------------------------------------------------------------------------
# DICOM
# ----------------------------------------------------------------------------------------------
_CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
_DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
_TRANSFER_SYNTAXES = {
    "explicit little endian": "1.2.840.10008.1.2.1",
    "implicit little endian": "1.2.840.10008.1.2",
    "rle lossless": "1.2.840.10008.1.2.5",
}
_FAKE_GIVEN = ("Alex", "Sam", "Robin", "Kim", "Jo", "Charlie", "Max", "Noa")
_FAKE_FAMILY = ("Phantom", "Synthetic", "Testcase", "Mockup", "Dummy")
_VIEWS = ("AP", "PA", "LL", "RL")


def _uid(*parts) -> str:
    from pydicom.uid import generate_uid

    # the pydicom root prefix + SHA-512 of the entropy sources: deterministic (prefix=None is random)
    return str(generate_uid(entropy_srcs=["salad-med-phantom", *map(str, parts)]))


def write_dicom(
    phantom: Phantom,
    path: str | os.PathLike,
    *,
    patient_id: str | None = None,
    modality: str = "CR",
    window: bool = True,
    transfer_syntax: str = "explicit little endian",
    rescale: tuple[float, float] = (1.0, 0.0),
    study_index: int = 1,
    series_index: int = 1,
    instance_number: int = 1,
    uid_namespace: str = "",
    **tags,
) -> Path:
    """Write ``phantom`` as a CR or DX DICOM file (pydicom, atomically) and return the path.

    UIDs (Study/Series/SOP Instance, Frame of Reference) are derived deterministically from
    ``uid_namespace``, the patient id, the indices and (SOP only) the phantom seed via
    ``pydicom.uid.generate_uid(entropy_srcs=...)`` under the pydicom root (``prefix=None`` would give
    random ``2.25.`` UIDs), so the same inputs give byte-identical files. Study date/time follow the
    study; the patient name (a fake ``Family^Given``: never log it), birth date and sex follow the
    patient.

    Args:
        phantom: from :func:`make_phantom` (pixel data written as stored, 8 bits -> BitsAllocated 8).
        path: output ``.dcm`` path.
        patient_id: PatientID (default: ``phantom.patient_id``).
        modality: ``"CR"`` (CR Image Storage) or ``"DX"`` (DX For Presentation, with Presentation LUT
            Shape and Detector Type); both carry PixelSpacing and ImagerPixelSpacing.
        window: write WindowCenter/WindowWidth covering the body part (in rescaled units).
        transfer_syntax: ``"explicit little endian"``, ``"implicit little endian"`` or ``"rle lossless"``.
        rescale: (RescaleSlope, RescaleIntercept); stored pixels are unchanged.
        study_index: study number (part of the StudyInstanceUID entropy and StudyID).
        series_index: series number.
        instance_number: instance number.
        uid_namespace: extra UID entropy, e.g. one per dataset, so that equal patient ids in two
            datasets do not share Study/Series UIDs.
        **tags: extra/overriding DICOM keywords, e.g. ``InstitutionName="X"``, ``StudyDate="20200101"``.

    Raises:
        ValueError: unknown modality / transfer syntax / keyword.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    if modality not in ("CR", "DX"):
        msg = f"write_dicom {path}: modality must be 'CR' or 'DX', got {modality!r}"
        raise ValueError(msg)
    ts_key = transfer_syntax.lower()
    if ts_key not in _TRANSFER_SYNTAXES:
        msg = f"write_dicom {path}: transfer_syntax {transfer_syntax!r} not in {sorted(_TRANSFER_SYNTAXES)}"
        raise ValueError(msg)
    pid = patient_id or phantom.patient_id
    sop_class = _CR_STORAGE if modality == "CR" else _DX_STORAGE
    ns = str(uid_namespace)
    study_uid = _uid(ns, "study", pid, study_index)
    series_uid = _uid(ns, "series", pid, study_index, series_index, modality)
    sop_uid = _uid(ns, "sop", pid, study_index, series_index, instance_number, phantom.seed)
    study_rng = np.random.default_rng(_hash_int(ns, pid, study_index))  # same for every view of a study
    when = datetime.date(2012, 1, 1) + datetime.timedelta(days=int(study_rng.integers(0, 3650)))
    tod = f"{int(study_rng.integers(7, 19)):02d}{int(study_rng.integers(60)):02d}{int(study_rng.integers(60)):02d}"

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = UID(_TRANSFER_SYNTAXES["explicit little endian"])
    ds.file_meta.ImplementationClassUID = UID(_uid("implementation", "salad-med"))
    ds.file_meta.ImplementationVersionName = "SALADMED_010"

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = UID(sop_uid)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = when.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = tod
    ds.AccessionNumber = f"A{_hash_int(pid, study_index) % 10**8:08d}"
    ds.Modality = modality
    ds.Manufacturer = "salad-med synthetic"
    ds.InstitutionName = "Synthetic Phantom Hospital"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"{phantom.body_part} phantom"
    ds.SeriesDescription = f"{phantom.body_part.removeprefix('XR_')} {_VIEWS[phantom.seed % 4]}"
    pat_rng = np.random.default_rng(_hash_int(ns, "patient", pid))  # same for every file of a patient
    family = _FAKE_FAMILY[int(pat_rng.integers(len(_FAKE_FAMILY)))]
    ds.PatientName = f"{family}^{_FAKE_GIVEN[int(pat_rng.integers(len(_FAKE_GIVEN)))]}"
    ds.PatientID = pid
    ds.PatientBirthDate = f"{int(pat_rng.integers(1940, 2010))}0101"
    ds.PatientSex = "MF"[int(pat_rng.integers(2))]
    ds.BodyPartExamined = phantom.body_part.removeprefix("XR_")
    ds.ViewPosition = _VIEWS[phantom.seed % 4]
    ds.StudyInstanceUID = UID(study_uid)
    ds.SeriesInstanceUID = UID(series_uid)
    ds.FrameOfReferenceUID = UID(_uid("for", pid, study_index, series_index))
    ds.StudyID = str(study_index)
    ds.SeriesNumber = series_index
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = ["L", "F"] if ds.ViewPosition in ("AP", "PA") else ["A", "F"]
    ds.ImageLaterality = phantom.laterality
    ds.Laterality = phantom.laterality
    ds.BurnedInAnnotation = "YES" if phantom.marker_mask.any() else "NO"
    ds.LossyImageCompression = "00"

    img = phantom.image
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = phantom.photometric
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    ds.BitsAllocated = 8 if img.dtype == np.uint8 else 16
    ds.BitsStored = phantom.bits_stored
    ds.HighBit = phantom.bits_stored - 1
    ds.PixelRepresentation = 0
    spacing = [f"{phantom.pixel_spacing[0]:.4f}", f"{phantom.pixel_spacing[1]:.4f}"]
    ds.PixelSpacing = spacing
    ds.ImagerPixelSpacing = spacing
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "IDENTITY"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
    slope, intercept = float(rescale[0]), float(rescale[1])
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    ds.RescaleType = "US"
    if window:
        c, wdt = phantom.window
        ds.WindowCenter = f"{c * slope + intercept:.1f}"
        ds.WindowWidth = f"{max(wdt * abs(slope), 1.0):.1f}"
        ds.VOILUTFunction = "LINEAR"
    ds.PixelData = np.ascontiguousarray(img.astype(img.dtype.newbyteorder("<"), copy=False)).tobytes()
    for key, value in tags.items():
        if key not in pydicom.datadict.keyword_dict:
            msg = f"write_dicom {path}: unknown DICOM keyword {key!r}"
            raise ValueError(msg)
        setattr(ds, key, value)

    if ts_key == "implicit little endian":
        ds.file_meta.TransferSyntaxUID = UID(_TRANSFER_SYNTAXES[ts_key])
    elif ts_key == "rle lossless":
        ds.compress(UID(_TRANSFER_SYNTAXES[ts_key]), encoding_plugin="pydicom", generate_instance_uid=False)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return Path(path)


def _hash_int(*parts) -> int:
    """Stable (process-independent) integer hash of ``parts`` (sha256, first 8 bytes)."""
    import hashlib

    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little")


def write_dicom_tree(root: str | os.PathLike, n: int = 12, seed: int = 0,
                     size: tuple[int, int] = (512, 416), anomaly_scale: float = 1.0,
                     body_parts: Sequence[str] = BODY_PARTS) -> pd.DataFrame:
    """Write ``n`` phantom DICOM files with ground truth under ``root``.

    A deterministic mix cycling through MONOCHROME1/2, 8/12/16 bits, CR/DX, three transfer syntaxes
    (explicit/implicit little endian, RLE lossless) and non-trivial rescale slope/intercept. Each
    patient has one study (same StudyInstanceUID, body part and label) of up to two views; the two
    views deliberately differ in photometric interpretation and bit depth. Layout: ``root/<patient_id>/<image_id>.dcm``, ``root/truth/<image_id>.npz``,
    ``root/truth.csv``. ``anomaly_scale`` is :attr:`PhantomSpec.anomaly_scale` of the abnormal files;
    ``body_parts`` the body parts drawn from.

    Returns:
        DataFrame, one row per file: ``image_id, path`` (relative), ``source_path`` (absolute),
        ``truth_path, patient_id, body_part, study, label, anomaly, carrier, photometric, bits, modality,
        transfer_syntax, rescale_slope, rescale_intercept, sop_instance_uid, study_instance_uid,
        series_instance_uid`` and the other truth columns of :func:`write_mura_tree`.
    """
    import pydicom

    root = Path(root)
    rng = np.random.default_rng([int(seed), 0xD1C7])
    rows = []
    ts_names = list(_TRANSFER_SYNTAXES)
    for i in range(n):
        pnum = 1 + i // 2
        pid = f"patient{90000 + pnum:05d}"
        if i % 2 == 0:  # one study of (up to) two views per patient: same body part and label
            body_part = body_parts[int(rng.integers(len(body_parts)))]
            anomaly = ANOMALIES[int(rng.integers(3))] if rng.random() < 0.4 else None
        bits = (8, 12, 16)[i % 3]
        spec = random_spec(rng, height=size[0], width=size[1], bits_stored=bits, monochrome1=bool(i % 2),
                           body_part=body_part, anomaly=anomaly, patient_id=pid, study="study1",
                           anomaly_scale=anomaly_scale)
        ph = make_phantom(spec, int(rng.integers(2**31)))
        modality = ("CR", "DX")[(i // 2) % 2]
        ts = ts_names[i % len(ts_names)]
        slope, intercept = ((1.0, 0.0), (1.0, -1024.0), (0.5, 0.0))[(i // 3) % 3]
        image_id = f"dicom_{pid}_{i:04d}"
        rel = f"{pid}/{image_id}.dcm"
        write_dicom(ph, root / rel, modality=modality, transfer_syntax=ts, rescale=(slope, intercept),
                    study_index=1, series_index=1, instance_number=i % 2 + 1, uid_namespace=f"tree-{seed}")
        save_truth(ph, root / "truth" / f"{image_id}.npz")
        ds = pydicom.dcmread(root / rel, stop_before_pixels=True)
        row = _truth_row(ph, image_id)
        row.update({"path": rel, "source_path": str((root / rel).resolve()),
                    "truth_path": f"truth/{image_id}.npz", "modality": modality, "transfer_syntax": ts,
                    "rescale_slope": slope, "rescale_intercept": intercept,
                    "sop_instance_uid": str(ds.SOPInstanceUID), "study_instance_uid": str(ds.StudyInstanceUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID)})
        rows.append(row)
    df = pd.DataFrame(rows)
    front = ["image_id", "path", "source_path", "truth_path", "patient_id", "body_part", "study", "label",
             "anomaly"]
    df = df[front + [c for c in df.columns if c not in front]]
    with atomic_path(root / "truth.csv") as tmp:
        df.to_csv(tmp, index=False)
    return df


def generate_demo_dataset(output_dir: str | os.PathLike, n_patients: int = 40,
                          size: tuple[int, int] | int = (256, 208), seed: int = 0,
                          n_dicom: int = 6, anomaly_scale: float = 1.0,
                          body_parts: Sequence[str] = BODY_PARTS,
                          spec_overrides: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """Write the offline demo dataset: a MURA-v1.1 PNG tree and a few DICOM files, with truth.

    Layout: ``output_dir/mura/`` (see :func:`write_mura_tree`; point MURA tools at it) and
    ``output_dir/dicom/`` (see :func:`write_dicom_tree`).

    Args:
        output_dir: destination folder.
        n_patients: patients of the MURA tree.
        size: (H, W) or one int (square) image size.
        seed: deterministic seed.
        n_dicom: number of DICOM files (0 = none).
        anomaly_scale: :attr:`PhantomSpec.anomaly_scale` of the abnormal images (1 = default size).
        body_parts: body parts drawn from (both parts).
        spec_overrides: fixed :class:`PhantomSpec` fields of the MURA-tree images (see
            :func:`write_mura_tree`).

    Returns:
        The truth rows of both parts concatenated, with a ``format`` column (``"png"`` / ``"dicom"``)
        and ``tree_root`` (the folder the relative ``path`` column is relative to).
    """
    out = Path(output_dir)
    hw = (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    mura = write_mura_tree(out / "mura", n_patients=n_patients, seed=seed, size=hw,
                           body_parts=body_parts, anomaly_scale=anomaly_scale, spec_overrides=spec_overrides)
    mura.insert(0, "format", "png")
    mura["tree_root"] = str((out / "mura").resolve())
    frames = [mura]
    if n_dicom:
        dcm = write_dicom_tree(out / "dicom", n=n_dicom, seed=seed + 1, size=hw, anomaly_scale=anomaly_scale,
                               body_parts=body_parts)
        dcm.insert(0, "format", "dicom")
        dcm["tree_root"] = str((out / "dicom").resolve())
        frames.append(dcm)
    return pd.concat(frames, ignore_index=True)


def contact_sheet(phantoms: Sequence[Phantom], path: str | os.PathLike, columns: int = 4,
                  outline: bool = True) -> Path:
    """Save an 8-bit PNG grid of phantoms in display polarity (bone bright), for eyeballing.

    With ``outline``, truth contours are overlaid: carrier (mid grey dots), body (white dots) and
    anomaly (black) boundaries.
    """
    tiles = []
    th = max(p.image.shape[0] for p in phantoms)
    tw = max(p.image.shape[1] for p in phantoms)
    for p in phantoms:
        d = (p.display() * 255).astype(np.uint8)
        tile = np.zeros((th + 4, tw + 4), dtype=np.uint8)
        tile[2: 2 + d.shape[0], 2: 2 + d.shape[1]] = d
        if outline:
            sub = tile[2: 2 + d.shape[0], 2: 2 + d.shape[1]]
            for m, val in ((p.carrier_mask, 128), (p.body_mask, 255), (p.anomaly_mask, 0)):
                edge = m & ~_erode1(m)
                dots = edge & (((np.indices(m.shape).sum(0)) % 3 == 0) if val != 0 else edge)
                sub[dots] = val
        tiles.append(tile)
    rows = []
    for i in range(0, len(tiles), columns):
        row = tiles[i: i + columns]
        row += [np.zeros_like(tiles[0])] * (columns - len(row))
        rows.append(np.concatenate(row, axis=1))
    return write_png(np.concatenate(rows, axis=0), path)


def _erode1(m: np.ndarray) -> np.ndarray:
    p = np.pad(m, 1, mode="edge")
    return p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]

