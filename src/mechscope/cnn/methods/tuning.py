"""Tuning curves of every conv unit on synthetic stimuli (Cammarata et al. 2020, "Curve Detectors"; Olah et
al. 2020, "Zoom In").

Each stage's channels are read at ``hook_post`` (after the activation) for every image of a
:class:`~mechscope.cnn.methods.stimuli.StimulusSet`, in two ways: the channel's **maximum over
positions** (wherever the stimulus suits it best) and its value **at the position whose receptive
field is centred on the stimulus** (receptive fields from the spec). A tuning curve is the mean over
the stimulus's positions of one of them along one parameter (angle, curvature, opening, radius),
the others held at the unit's preferred values.

Sharpness of orientation tuning is the **circular variance** of the responses r over angle θ
(responses below zero count as zero): ``1 − |Σ r e^{i k θ}| / Σ r`` with k = 2 for lines (angles
over 180°) and k = 1 for edges, arcs, line endings and corners (over 360°): 0 when only one angle
excites the unit, 1 when every angle excites it equally. A unit that responds to every edge
because it responds to light (or to a black image) is therefore broad, not sharp. Sizes (blobs,
rings) have a **size fall-off** instead: 1 − (the smallest response at a larger radius) / (the
response at the preferred radius); 0 when bigger is always better (the unit likes light, not a
shape), 1 when larger ones leave it silent.

A label is proposed only where both hold, for the family of stimuli that drives the unit most
among those that pass:

* **sharp**: circular variance ≤ :data:`CV_MAX` = 0.3, or size fall-off ≥ :data:`FALLOFF_MIN` =
  0.5. A linear oriented filter followed by a ReLU answers edges with a half-wave rectified
  cosine, circular variance 1 − π/4 ≈ 0.21; a full cosine modulation reaching zero only at the
  opposite angle (1 + cos θ) has 0.5. 0.3 leaves room for pixelation and jitter above the ideal
  filter's 0.21 while random first-layer kernels rarely reach it: of 128 random 5×5 kernels in the
  default network's conv1 (zero bias; ``bench/tuning.py --random``), 3 with N(0, 1) weights (2
  edges, 1 blob) and none with U(−1, 1) weights get a label; at 0.4, 6 and 3 would have a sharp
  oriented family that passes the drive test;
* **driven**: the family's best image reaches at least half the unit's maximum over the test
  images (``drive`` = its response / that maximum ≥ :data:`DRIVE_MIN` = 0.5).

Otherwise the unit is "not tuned to these stimuli", with the numbers that failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from mechscope.cnn.methods.stimuli import ANGLE_PERIOD, ANGLE_STEP, Stimulus, StimulusSet
from mechscope.core.errors import MechscopeError
from mechscope.core.hooks import run_with_cache
from mechscope.core.results import Result, figure_data
from mechscope.core.torch_utils import evaluating

CV_MAX = 0.3
FALLOFF_MIN = 0.5
DRIVE_MIN = 0.5
NOT_TUNED = "not tuned to these stimuli"
SIZE_FAMILIES = ("blob", "ring")


def circular_variance(response, angles_deg, harmonic: int = 1) -> float:
    """1 − |Σ r e^{i·harmonic·θ}| / Σ r over r = max(response, 0); 1.0 when nothing responds."""
    r = np.clip(np.asarray(response, dtype=np.float64), 0.0, None)
    total = r.sum()
    if not total > 0:
        return 1.0
    z = (r * np.exp(1j * harmonic * np.radians(np.asarray(angles_deg, dtype=np.float64)))).sum()
    return float(min(max(1.0 - abs(z) / total, 0.0), 1.0))


def size_falloff(response, index: int) -> float:
    """1 − min(evoked response at larger radii) / evoked response at ``index`` (0 when it is the largest)."""
    r = np.clip(np.asarray(response, dtype=np.float64), 0.0, None)
    if index >= len(r) - 1 or not r[index] > 0:
        return 0.0
    return float(1.0 - r[index + 1 :].min() / r[index])


@dataclass(frozen=True)
class Curve(Result):
    """One tuning curve of one unit: response along ``axis`` with the other parameters in ``fixed``."""

    family: str
    axis: str  # angle (degrees), curvature (1/pixels), opening (degrees) or radius (pixels)
    x: tuple[float, ...]
    response: tuple[float, ...]  # mean over positions of the channel's maximum over the map
    response_centre: tuple[float, ...]  # mean over positions at the position whose field is centred on it
    fixed: dict  # the other parameters, at the unit's preferred values
    circular_variance: float | None = None  # angle curves, on the evoked response (see the module docstring)


@dataclass(frozen=True)
class UnitTuning(Result):
    stage: str
    channel: int
    blank: float  # response to a black image (maximum over positions)
    dataset_max: float  # maximum over the test images of the maximum over positions
    curves: tuple[Curve, ...]
    preferred: Stimulus  # the image that drives the unit most, of all families
    preferred_response: float
    family_best: dict  # family -> {"response", "drive", "sharpness", "sharp"} of its best stimulus
    tuned: bool
    label: str  # e.g. "edge detector, dark→light at 45°", or NOT_TUNED
    label_family: str | None
    label_stimulus: Stimulus | None  # the best image of the labelled family
    drive: float  # of the labelled family's best image (else the preferred one's): response / dataset_max
    sharpness: float | None  # the labelled (else preferred) family's circular variance or size fall-off
    sharpness_kind: str | None  # "circular variance" or "size fall-off"
    reason: str  # the numbers behind the label
    preferred_image: torch.Tensor = figure_data()  # [C_in, H, W] as drawn (stimulus values, [0, 1])
    label_image: torch.Tensor | None = figure_data()

    def curve(self, family: str, axis: str) -> Curve | None:
        return next((c for c in self.curves if c.family == family and c.axis == axis), None)

    @property
    def name(self) -> str:
        return f"{self.stage}_{self.channel}"

    def stronger(self) -> list[str]:
        """Families whose best image drives a labelled unit more than its labelled family's does (none of them
        passes the label's tests, or it would be the label), strongest first: the label names the unit's sharpest
        driven tuning, not its strongest response."""
        return stronger_families(self.family_best, self.label_family)


@dataclass(frozen=True)
class StageTuning(Result):
    stage: str
    hook: str
    receptive_field: dict
    units: tuple[UnitTuning, ...]

    @property
    def tuned(self) -> list[UnitTuning]:
        return [u for u in self.units if u.tuned]


@dataclass(frozen=True)
class TuningResult(Result):
    """What ``cnn tuning`` measured; JSON is ``to_dict()`` (tuning.json)."""

    SCHEMA = "mechscope.tuning/2"
    FILE = "tuning.json"

    run: str | None
    weights_sha256: str | None  # runs.weights_hash of the model: the microscope shows only the same weights'
    input_shape: tuple[int, int, int]
    value_range: tuple[float, float]  # stimulus 0 and 1 are drawn as these input values
    stimuli: StimulusSet
    thresholds: dict
    stages: tuple[StageTuning, ...]
    summary: tuple[str, ...] = ()
    seconds: dict | None = None
    work: dict | None = None  # forward and backward passes, in passes over the test images (WorkCounter)

    def stage(self, name: str) -> StageTuning:
        for s in self.stages:
            if s.stage == name:
                return s
        raise MechscopeError(f"unknown stage {name!r}; the stages are {', '.join(s.stage for s in self.stages)}")

    @property
    def units(self) -> list[UnitTuning]:
        return [u for s in self.stages for u in s.units]

    @property
    def tuned(self) -> list[UnitTuning]:
        return [u for u in self.units if u.tuned]


# ---- responses --------------------------------------------------------------------------------


def model_inputs(stim: StimulusSet, input_shape, value_range=(0.0, 1.0)) -> torch.Tensor:
    """Stimuli as the model's input: [N, C_in, H, W], channels replicated, 0 → lo and 1 → hi."""
    c, h, w = input_shape
    if tuple(stim.size) != (h, w):
        raise MechscopeError(f"stimuli are {stim.size[0]}×{stim.size[1]}; the model takes {h}×{w} images")
    lo, hi = value_range
    x = stim.images.expand(-1, c, -1, -1)
    return (lo + (hi - lo) * x).contiguous() if (lo, hi) != (0.0, 1.0) else x.contiguous()


def centre_positions(stage, stimuli, map_hw: tuple[int, int]) -> torch.Tensor:
    """[N, 2] (y, x) of the map position whose receptive field is centred nearest each stimulus's centre."""
    rf = stage.rf_post
    out = []
    for st in stimuli:
        pos = []
        for a in range(2):
            # the field of position p spans pixels start + p·jump ... + size − 1: its centre is start + p·jump + size/2
            p = round((st.centre[a] - rf.start[a] - rf.size[a] / 2) / rf.jump[a])
            pos.append(min(max(p, 0), map_hw[a] - 1))
        out.append(pos)
    return torch.tensor(out, dtype=torch.long)


def responses(spec, x: torch.Tensor, stimuli, batch_size: int = 512) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """stage -> ([N, C] maximum over positions, [N, C] at the centred position) at each stage's hook_post."""
    net = spec.model
    names = [s.hook_post for s in spec.stages]
    parts: dict[str, list] = {s.name: [] for s in spec.stages}
    with evaluating(net), torch.no_grad():
        for i in range(0, len(x), batch_size):
            _, cache = run_with_cache(net, x[i : i + batch_size], names=names)
            for s in spec.stages:
                a = cache[s.hook_post]  # [B, C, H', W']
                pos = centre_positions(s, stimuli[i : i + batch_size], tuple(a.shape[2:]))
                rows = torch.arange(len(a))
                centre = a[rows, :, pos[:, 0], pos[:, 1]]  # [B, C]
                parts[s.name].append((a.flatten(2).amax(2), centre))
    return {k: (torch.cat([m for m, _ in v]), torch.cat([c for _, c in v])) for k, v in parts.items()}


def dataset_max(spec, images: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """stage -> [C] maximum over ``images`` of each channel's maximum over positions at hook_post."""
    from mechscope.cnn.methods.featvis import dataset_examples

    ex = dataset_examples(spec.model, images, [s.hook_post for s in spec.stages], k=1, batch_size=batch_size)
    return {s.name: ex[s.hook_post].top_values[:, 0] for s in spec.stages}


# ---- curves and labels ----------------------------------------------------------------------


class _Settings:
    """The set's stimuli grouped by setting (parameters without the position)."""

    def __init__(self, stim: StimulusSet) -> None:
        self.keys: list[tuple] = []
        index: dict[tuple, int] = {}
        members: list[list[int]] = []
        for i, st in enumerate(stim.stimuli):
            k = st.setting()
            if k not in index:
                index[k] = len(self.keys)
                self.keys.append(k)
                members.append([])
            members[index[k]].append(i)
        self.index = index
        width = max(len(m) for m in members)
        self.members = torch.tensor([m + [m[0]] * (width - len(m)) for m in members])  # [S, P] (padded rarely)
        self.counts = torch.tensor([len(m) for m in members], dtype=torch.float32)
        self.family = [k[0] for k in self.keys]
        self.by_family: dict[str, list[int]] = {}
        for j, f in enumerate(self.family):
            self.by_family.setdefault(f, []).append(j)

    def mean(self, r: torch.Tensor) -> torch.Tensor:
        """[N, C] -> [S, C]: mean over each setting's positions."""
        g = r[self.members]  # [S, P, C]
        mask = (torch.arange(self.members.shape[1])[None, :] < self.counts[:, None]).to(r.dtype)
        return (g * mask[..., None]).sum(1) / self.counts[:, None].to(r.dtype)

    def rows(self, family: str, **fixed) -> list[int]:
        pos = {"angle": 1, "radius": 2, "opening": 3}
        return [j for j in self.by_family[family] if all(self.keys[j][pos[n]] == v for n, v in fixed.items())]


def _curve(grid: _Settings, family: str, axis: str, mean_m, mean_c, c: int, fixed: dict) -> Curve:
    rows = grid.rows(family, **fixed)
    param = {"curvature": "radius"}.get(axis, axis)
    pairs = [(grid.keys[j][("family", "angle", "radius", "opening").index(param)], j) for j in rows]
    if axis == "curvature":
        pairs = sorted(((1.0 / v, j) for v, j in pairs), key=lambda p: p[0])
    x = tuple(float(v) for v, _ in pairs)
    y = tuple(float(mean_m[j, c]) for _, j in pairs)
    yc = tuple(float(mean_c[j, c]) for _, j in pairs)
    cv = None
    if axis == "angle":
        harmonic = 360 // ANGLE_PERIOD[family]
        cv = circular_variance(y, x, harmonic)
    return Curve(family, axis, x, y, yc, fixed, cv)


def _family_curves(grid, family, mean_m, mean_c, c) -> tuple[list[Curve], int]:
    """The unit's curves for one family, and the setting row of the family's best (mean over positions)."""
    rows = grid.rows(family)
    best = max(rows, key=lambda j: float(mean_m[j, c]))
    _, angle, radius, opening = grid.keys[best]
    args = (mean_m, mean_c, c)
    if family in ("line", "edge", "line_end"):
        return [_curve(grid, family, "angle", *args, {})], best
    if family == "curve":
        return [_curve(grid, family, "angle", *args, {"radius": radius}),
                _curve(grid, family, "curvature", *args, {"angle": angle})], best  # fmt: skip
    if family == "corner":
        return [_curve(grid, family, "angle", *args, {"opening": opening}),
                _curve(grid, family, "opening", *args, {"angle": angle})], best  # fmt: skip
    return [_curve(grid, family, "radius", *args, {})], best


def label_text(st: Stimulus) -> str:
    """The words for a stimulus: 'line at 90°', 'edge detector, dark→light at 45°', 'blob, radius 3'..."""
    f = st.family
    if f == "line":
        return f"line at {st.angle:.0f}°"
    if f == "edge":
        return f"edge detector, dark→light at {st.angle:.0f}°"
    if f == "curve":
        return f"curve, radius {st.radius:g} (curvature {1 / st.radius:.2f}), opening towards {st.angle:.0f}°"
    if f == "line_end":
        return f"line ending, the line running towards {st.angle:.0f}°"
    if f == "corner":
        return f"corner of {st.opening:.0f}°, opening towards {st.angle:.0f}°"
    if f == "blob":
        return f"blob, radius {st.radius:g}"
    if f == "ring":
        return f"loop, radius {st.radius:g}"
    raise MechscopeError(f"unknown stimulus family {f!r}")


def stronger_families(family_best: dict, family: str | None) -> list[str]:
    """The families whose best response exceeds ``family``'s, strongest first (none when ``family`` is None or
    not measured)."""
    if family not in family_best:
        return []
    own = family_best[family]["response"]
    return sorted((f for f, d in family_best.items() if d["response"] > own), key=lambda f: -family_best[f]["response"])


def _stronger_text(family_best: dict, family: str) -> str:
    more = stronger_families(family_best, family)
    if not more:
        return ""
    return "; driven more by families it is not labelled for: " + ", ".join(
        f"{f} (drive {family_best[f]['drive']:.2f}, {family_best[f]['sharpness_kind']} "
        f"{family_best[f]['sharpness']:.2f})" for f in more
    )


def unit_tuning(stage: str, c: int, stim: StimulusSet, grid: _Settings, r_max, r_centre, blank: float,
                dmax: float, means=None) -> UnitTuning:  # fmt: skip
    """One unit's curves, preferred stimulus and label from its responses [N, C] (see the module docstring).

    ``means``: (``grid.mean(r_max)``, ``grid.mean(r_centre)``) as numpy arrays, when already computed.
    """
    mean_m, mean_c = means if means is not None else (grid.mean(r_max).numpy(), grid.mean(r_centre).numpy())
    curves: list[Curve] = []
    best_image: dict[str, int] = {}
    family_best: dict[str, dict] = {}
    families = list(dict.fromkeys(grid.family))
    for family in families:
        fc, row = _family_curves(grid, family, mean_m, mean_c, c)
        curves += fc
        members = grid.members[row, : int(grid.counts[row])]
        i = int(members[int(r_max[members, c].argmax())])  # the best of the best setting's positions
        best_image[family] = i
        value = float(r_max[i, c])
        drive = value / dmax if dmax > 0 else 0.0
        if family in SIZE_FAMILIES:
            size = next(cv for cv in fc if cv.axis == "radius")
            k = size.x.index(stim.stimuli[i].radius)
            kind, sharp_v = "size fall-off", size_falloff(size.response, k)
            sharp = sharp_v >= FALLOFF_MIN
            largest = k == len(size.x) - 1  # no larger radius drawn: the fall-off is 0 by definition
        else:
            kind, sharp_v = "circular variance", next(cv for cv in fc if cv.axis == "angle").circular_variance
            sharp = sharp_v <= CV_MAX
        family_best[family] = {"response": value, "drive": drive, "sharpness": sharp_v, "sharpness_kind": kind,
                               "sharp": bool(sharp), "image": i}  # fmt: skip
        if family in SIZE_FAMILIES:
            family_best[family]["at_largest_radius"] = bool(largest)
    top = max(families, key=lambda f: family_best[f]["response"])
    passing = [f for f in families if family_best[f]["sharp"] and family_best[f]["drive"] >= DRIVE_MIN]
    chosen = max(passing, key=lambda f: family_best[f]["response"]) if passing else None
    fb = family_best[chosen or top]
    i_top = best_image[top]
    if chosen is not None:
        st = stim.stimuli[fb["image"]]
        label = label_text(st)
        reason = (f"{chosen}: {fb['sharpness_kind']} {fb['sharpness']:.2f}, best image reaches "
                  f"{fb['drive']:.2f} of the test-set maximum" + _stronger_text(family_best, chosen))  # fmt: skip
    else:
        st = None
        label = NOT_TUNED
        if not dmax > 0:
            reason = f"silent: its maximum over the test images is {dmax:.3g}"
        else:
            fails = []
            if not fb["sharp"]:
                op = ">" if fb["sharpness_kind"] == "circular variance" else "<"
                limit = CV_MAX if fb["sharpness_kind"] == "circular variance" else FALLOFF_MIN
                fails.append(f"{fb['sharpness_kind']} {fb['sharpness']:.2f} {op} {limit}"
                             + (" (it responds most at the largest radius drawn: bigger is better up to there)"
                                if fb.get("at_largest_radius") else ""))  # fmt: skip
            if fb["drive"] < DRIVE_MIN:
                fails.append(f"drive {fb['drive']:.3f} < {DRIVE_MIN}")
            reason = f"preferred family {top}: " + ", ".join(fails)
            if any(family_best[f]["sharp"] for f in families if f != top):
                sharp_weak = [f for f in families if family_best[f]["sharp"] and f != top]
                reason += "; sharp but too weak: " + ", ".join(
                    f"{f} (drive {family_best[f]['drive']:.3f})" for f in sharp_weak
                )
    clean_best = {f: {k: v for k, v in d.items() if k != "image"} for f, d in family_best.items()}
    return UnitTuning(
        stage=stage, channel=c, blank=blank, dataset_max=dmax, curves=tuple(curves), preferred=stim.stimuli[i_top],
        preferred_response=float(r_max[i_top, c]), family_best=clean_best, tuned=chosen is not None, label=label,
        label_family=chosen, label_stimulus=st, drive=float(fb["drive"]), sharpness=fb["sharpness"],
        sharpness_kind=fb["sharpness_kind"], reason=reason, preferred_image=stim.images[i_top],
        label_image=stim.images[fb["image"]] if chosen else None,
    )  # fmt: skip


def tuning(spec, stim: StimulusSet, maxima: dict[str, torch.Tensor], value_range=(0.0, 1.0), *, run=None,
           weights_sha256=None, batch_size: int = 512) -> TuningResult:  # fmt: skip
    """Tuning curves, preferred stimuli and labels of every channel of every stage of ``spec``.

    ``maxima``: stage -> [C] each channel's maximum over the test images (:func:`dataset_max`).
    """
    missing = [s.name for s in spec.stages if s.name not in maxima]
    if missing:
        raise MechscopeError(f"no test-set maxima for {', '.join(missing)}")
    x = model_inputs(stim, spec.input_shape, value_range)
    resp = responses(spec, x, stim.stimuli, batch_size)
    lo = value_range[0]
    black = torch.full((1, *spec.input_shape), float(lo))
    blank_resp = responses(spec, black, [Stimulus("blank", centre=(stim.size[0] / 2, stim.size[1] / 2))])
    grid = _Settings(stim)
    stages = []
    for s in spec.stages:
        r_max, r_centre = resp[s.name]
        blank = blank_resp[s.name][0][0]
        means = (grid.mean(r_max).numpy(), grid.mean(r_centre).numpy())
        units = tuple(
            unit_tuning(s.name, c, stim, grid, r_max, r_centre, float(blank[c]), float(maxima[s.name][c]), means)
            for c in range(r_max.shape[1])
        )
        stages.append(StageTuning(s.name, s.hook_post, s.rf_post.to_dict(), units))
    thresholds = {
        "circular_variance_max": CV_MAX, "size_falloff_min": FALLOFF_MIN, "drive_min": DRIVE_MIN,
        "angle_step_degrees": ANGLE_STEP,
    }  # fmt: skip
    return TuningResult(
        run=str(run) if run is not None else None, weights_sha256=weights_sha256,
        input_shape=tuple(spec.input_shape), value_range=(float(value_range[0]), float(value_range[1])),
        stimuli=stim, thresholds=thresholds, stages=tuple(stages),
    )  # fmt: skip


def preferred_angle(curve: Curve) -> float:
    """The angle of the curve's peak (degrees)."""
    return curve.x[int(np.argmax(curve.response))]


def angle_difference(a: float, b: float, period: float = 360.0) -> float:
    """|a − b| on a circle of ``period`` degrees."""
    d = math.fmod(abs(a - b), period)
    return min(d, period - d)
