"""Parametric synthetic stimuli for tuning curves (Cammarata et al. 2020, "Curve Detectors", Distill).

Seven families, drawn white (1) on black (0) as MNIST digits are, at any image size:

* ``line``: an infinite line through the stimulus centre, angle 0-165° in 15° steps (0° horizontal,
  90° vertical);
* ``edge``: a half-plane, dark → light in direction 0-345° (0°: dark on the left, light on the right);
* ``curve``: an arc whose midpoint is the stimulus centre, over radius (curvature 1/radius) and
  orientation 0-345° (the direction from the arc's midpoint towards its circle's centre: the side the
  curve opens to);
* ``line_end``: a line that starts at the centre and runs off the image in direction 0-345°;
* ``corner``: two such lines from the centre, ``opening`` degrees apart, over orientation 0-345° (the
  bisector: the direction the corner opens towards);
* ``blob``: a disc over radius; ``ring``: a loop (circle outline) over radius.

Angles are counter-clockwise from "right" as seen on screen (y up). Every stimulus is drawn at a
few positions (the image centre and four offsets on the diagonals) with a seeded sub-pixel jitter.
Anti-aliasing: each shape is a signed distance function, rendered on a grid ``supersample`` times
finer with a one-fine-pixel linear ramp at its boundary, then averaged down to pixels: pixel values
are the area the shape covers, so edges have intermediate greys. Numpy/torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result, figure_data
from mechscope.core.validate import check_seed

FAMILIES = ("line", "edge", "curve", "line_end", "corner", "blob", "ring")
ANGLE_PERIOD = {"line": 180, "edge": 360, "curve": 360, "line_end": 360, "corner": 360}
ANGLE_STEP = 15
CORNER_OPENINGS = (60.0, 90.0, 120.0)


@dataclass(frozen=True)
class Stimulus:
    """One drawn image's parameters; ``None`` where a family has no such parameter."""

    family: str
    angle: float | None = None  # degrees (see the module docstring for each family's meaning)
    radius: float | None = None  # pixels: arcs (curvature = 1/radius), blobs, rings
    opening: float | None = None  # degrees between a corner's arms
    position: int = 0  # index of the offset (0: the image centre)
    centre: tuple[float, float] = (0.0, 0.0)  # (row, col) in pixels, jitter included

    def setting(self) -> tuple:
        """The parameters without the position: stimuli sharing it are averaged in a tuning curve."""
        return (self.family, self.angle, self.radius, self.opening)


@dataclass(frozen=True)
class StimulusSet(Result):
    """The drawn images [N, 1, H, W] in [0, 1] and their parameters, in the same order."""

    size: tuple[int, int]
    seed: int
    width: float  # stroke width of lines, arcs, rings, in pixels
    supersample: int
    offsets: tuple[tuple[float, float], ...]  # (d_row, d_col) of each position before jitter
    radii: dict  # family -> the radii drawn
    family_counts: dict[str, int]  # family -> images drawn (the JSON's "counts")
    stimuli: tuple[Stimulus, ...] = figure_data(())
    images: torch.Tensor = figure_data()

    def __len__(self) -> int:
        return len(self.stimuli)

    def counts(self) -> dict[str, int]:
        return dict(self.family_counts)

    def to_dict(self) -> dict:
        d = super().to_dict()
        return d | {"counts": d.pop("family_counts")}

    @classmethod
    def from_dict(cls, d: dict) -> StimulusSet:
        return super().from_dict({k: v for k, v in d.items() if k != "counts"} | {"family_counts": d["counts"]})


def default_radii(size: int) -> dict[str, tuple[float, ...]]:
    """Radii scaled to the image (listed for 28×28): arcs 2.5-11 px, blobs 1-6.5 px, rings 3-9 px."""
    s = size / 28.0

    def scaled(values):
        return tuple(sorted({round(max(v * s, 0.75), 2) for v in values}))

    return {
        "curve": scaled((2.5, 3.5, 5.0, 7.5, 11.0)),
        "blob": scaled((1.0, 1.5, 2.0, 3.0, 4.5, 6.5)),
        "ring": scaled((3.0, 4.5, 6.5, 9.0)),
    }


def stroke_width(size: int) -> float:
    """2.1 px at 28×28 (MNIST strokes are 2-3 px), never under 1.5 px."""
    return max(1.5, 0.075 * size)


def settings(size: int) -> list[Stimulus]:
    """Every (family, parameters) drawn, at position 0, in the order of the set."""
    radii = default_radii(size)
    out: list[Stimulus] = []
    for a in range(0, 180, ANGLE_STEP):
        out.append(Stimulus("line", angle=float(a)))
    for a in range(0, 360, ANGLE_STEP):
        out.append(Stimulus("edge", angle=float(a)))
    for r in radii["curve"]:
        for a in range(0, 360, ANGLE_STEP):
            out.append(Stimulus("curve", angle=float(a), radius=r))
    for a in range(0, 360, ANGLE_STEP):
        out.append(Stimulus("line_end", angle=float(a)))
    for o in CORNER_OPENINGS:
        for a in range(0, 360, ANGLE_STEP):
            out.append(Stimulus("corner", angle=float(a), opening=o))
    for r in radii["blob"]:
        out.append(Stimulus("blob", radius=r))
    for r in radii["ring"]:
        out.append(Stimulus("ring", radius=r))
    return out


def draw_stimuli(
    size: int | tuple[int, int],
    seed: int = 0,
    jitter: float = 0.5,
    supersample: int = 4,
    families: tuple[str, ...] = FAMILIES,
) -> StimulusSet:
    """Every family at every parameter and position, as a :class:`StimulusSet` of [N, 1, H, W] images in [0, 1].

    ``jitter``: each stimulus's centre moves by up to this many pixels in each direction, drawn from a
    generator seeded with ``seed`` (the same seed gives the same images).
    """
    check_seed(seed)
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if min(h, w) < 4:
        raise MechscopeError(f"images of {h}×{w} are too small for stimuli (at least 4×4)")
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise MechscopeError(f"unknown stimulus family {unknown[0]!r}; expected some of {', '.join(FAMILIES)}")
    d = max(1.0, round(min(h, w) / 10))
    offsets = ((0.0, 0.0), (-d, -d), (-d, d), (d, -d), (d, d))
    g = torch.Generator().manual_seed(seed)
    base = [s for s in settings(min(h, w)) if s.family in families]
    n = len(base) * len(offsets)
    shifts = (torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * jitter
    stimuli = []
    for i, (s, (p, off)) in enumerate((s, po) for s in base for po in enumerate(offsets)):
        cy = h / 2 + off[0] + float(shifts[i, 0])
        cx = w / 2 + off[1] + float(shifts[i, 1])
        stimuli.append(Stimulus(s.family, s.angle, s.radius, s.opening, p, (cy, cx)))
    width = stroke_width(min(h, w))
    images = render(stimuli, (h, w), width, supersample)
    radii = {k: v for k, v in default_radii(min(h, w)).items() if k in families}
    counts: dict[str, int] = {}
    for s in stimuli:
        counts[s.family] = counts.get(s.family, 0) + 1
    return StimulusSet((h, w), seed, width, supersample, offsets, radii, counts, tuple(stimuli), images)


# ---- drawing ---------------------------------------------------------------------------------


def render(stimuli: list[Stimulus], size: tuple[int, int], width: float, supersample: int = 4,
           chunk: int = 256) -> torch.Tensor:  # fmt: skip
    """[N, 1, H, W] area coverage in [0, 1] of each stimulus's shape."""
    h, w = size
    ss = max(1, int(supersample))
    # fine-grid sample points, in pixel units: column x to the right, row y down
    ys = (torch.arange(h * ss, dtype=torch.float32) + 0.5) / ss
    xs = (torch.arange(w * ss, dtype=torch.float32) + 0.5) / ss
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    out = torch.empty(len(stimuli), 1, h, w)
    for s in range(0, len(stimuli), chunk):
        part = stimuli[s : s + chunk]
        cy = torch.tensor([st.centre[0] for st in part], dtype=torch.float32)[:, None, None]
        cx = torch.tensor([st.centre[1] for st in part], dtype=torch.float32)[:, None, None]
        px, py = xx[None] - cx, -(yy[None] - cy)  # [n, H*ss, W*ss], y up, origin at the centre
        sd = torch.stack([signed_distance(st, px[i], py[i], width, (h, w)) for i, st in enumerate(part)])
        fine = (0.5 - sd * ss).clamp(0.0, 1.0)  # a one-fine-pixel ramp across the boundary
        out[s : s + len(part), 0] = F.avg_pool2d(fine[:, None], ss)[:, 0] if ss > 1 else fine
    return out


def _unit(deg: float) -> tuple[float, float]:
    a = math.radians(deg)
    return math.cos(a), math.sin(a)


def _ray(px, py, deg: float, length: float):
    """Distance to the segment from the origin of ``length`` in direction ``deg``."""
    ux, uy = _unit(deg)
    t = (px * ux + py * uy).clamp(0.0, length)
    return torch.hypot(px - t * ux, py - t * uy)


def signed_distance(st: Stimulus, px: torch.Tensor, py: torch.Tensor, width: float, size) -> torch.Tensor:
    """Signed distance (pixels; negative inside) from points (px, py) to the stimulus's shape."""
    half = width / 2
    far = 2.0 * (size[0] + size[1])  # rays run off the image
    f = st.family
    if f == "line":
        nx, ny = -math.sin(math.radians(st.angle)), math.cos(math.radians(st.angle))
        return (px * nx + py * ny).abs() - half
    if f == "edge":
        ux, uy = _unit(st.angle)
        return -(px * ux + py * uy)  # light where the point lies in direction ``angle``
    if f == "line_end":
        return _ray(px, py, st.angle, far) - half
    if f == "corner":
        a, b = st.angle - st.opening / 2, st.angle + st.opening / 2
        return torch.minimum(_ray(px, py, a, far), _ray(px, py, b, far)) - half
    if f == "blob":
        return torch.hypot(px, py) - st.radius
    if f == "ring":
        return (torch.hypot(px, py) - st.radius).abs() - half
    if f == "curve":
        return _arc(px, py, st.angle, st.radius, min(size)) - half
    raise MechscopeError(f"unknown stimulus family {f!r}")


def _arc(px, py, deg: float, radius: float, size: int) -> torch.Tensor:
    """Distance to an arc of length about half the image (at most a half circle) whose midpoint is the origin
    and whose circle's centre lies ``radius`` away in direction ``deg``."""
    ux, uy = _unit(deg)
    cx, cy = radius * ux, radius * uy
    qx, qy = px - cx, py - cy
    mid = math.atan2(-uy, -ux)  # the midpoint (origin) seen from the circle's centre
    half_aperture = min(0.5 * size / radius, math.pi) / 2
    rel = torch.remainder(torch.atan2(qy, qx) - mid + math.pi, 2 * math.pi) - math.pi
    on = (torch.hypot(qx, qy) - radius).abs()
    ends = [(cx + radius * math.cos(mid + s * half_aperture), cy + radius * math.sin(mid + s * half_aperture))
            for s in (-1, 1)]  # fmt: skip
    to_end = torch.minimum(*(torch.hypot(px - ex, py - ey) for ex, ey in ends))
    return torch.where(rel.abs() <= half_aperture, on, to_end)


def principal_angle(image: torch.Tensor) -> float:
    """Orientation (degrees in [0, 180), y up) of the principal axis of an image's intensity (second moments)."""
    img = image.squeeze().double()
    h, w = img.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                            indexing="ij")  # fmt: skip
    m = img.sum()
    x, y = xx + 0.5, -(yy + 0.5)  # y up
    mx, my = (img * x).sum() / m, (img * y).sum() / m
    cxx = (img * (x - mx) ** 2).sum() / m
    cyy = (img * (y - my) ** 2).sum() / m
    cxy = (img * (x - mx) * (y - my)).sum() / m
    angle = round(math.degrees(0.5 * math.atan2(2 * float(cxy), float(cxx - cyy))), 9) % 180.0
    return angle
