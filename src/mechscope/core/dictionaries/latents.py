"""What a dictionary's latents did over a sample: the nonzero activations, and per-latent summaries for dashboards.

Both wings feed the latents ``f [n, d_sae]`` of consecutive batches of rows (image positions, tokens) to a
:class:`LatentCollector`; it keeps only the nonzero entries, as three flat arrays (row, latent, value), so a
sample of N rows with mean L0 ``l`` holds ``N * l`` entries (12 bytes each) whatever ``d_sae``. From them:

- :func:`latent_summary`: one latent's dashboard numbers: density (share of rows where it fires), maximum, mean
  when active, the top ``k`` rows, samples from activation *quantile bands* (not only the top: the rows whose
  activation lies in each band of ``(q_i, q_{i+1}]`` of the latent's nonzero activations, a seeded draw from
  each), and the histogram of its nonzero activations;
- :func:`densities`, :func:`maxima`: the same for every latent at once.

A wing maps a row back to what it was (image and position; sequence and token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result


class LatentCollector:
    """Accumulates the nonzero latent activations of consecutive batches ``f [n, d_sae]`` (rows numbered in
    the order fed)."""

    def __init__(self, d_sae: int) -> None:
        self.d_sae = d_sae
        self.rows: list[np.ndarray] = []
        self.latents: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self.n_rows = 0

    def update(self, f: torch.Tensor) -> None:
        if f.ndim != 2 or f.shape[1] != self.d_sae:
            raise MechscopeError(f"expected latents [n, {self.d_sae}], got {tuple(f.shape)}")
        f = f.detach().float().cpu()
        r, c = torch.nonzero(f, as_tuple=True)
        self.rows.append((r + self.n_rows).numpy().astype(np.int64))
        self.latents.append(c.numpy().astype(np.int32))
        self.values.append(f[r, c].numpy())
        self.n_rows += f.shape[0]

    def result(self) -> LatentActivations:
        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))  # noqa: E731
        rows, latents, values = cat(self.rows, np.int64), cat(self.latents, np.int32), cat(self.values, np.float32)
        order = np.lexsort((rows, latents))  # by latent, then row
        return LatentActivations(rows[order], latents[order], values[order], self.n_rows, self.d_sae)


@dataclass(frozen=True)
class LatentActivations:
    """Nonzero latent activations of ``n_rows`` rows, sorted by latent then row: ``rows``, ``latents``,
    ``values`` (equal lengths)."""

    rows: np.ndarray
    latents: np.ndarray
    values: np.ndarray
    n_rows: int
    d_sae: int

    def of(self, latent: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, values) where ``latent`` fires."""
        if not 0 <= latent < self.d_sae:
            raise MechscopeError(f"latent {latent} out of range: the dictionary has latents 0..{self.d_sae - 1}")
        lo, hi = np.searchsorted(self.latents, [latent, latent + 1])
        return self.rows[lo:hi], self.values[lo:hi]

    def dense(self, latent: int) -> np.ndarray:
        """``latent``'s activation on every row, [n_rows] (zeros where it does not fire)."""
        out = np.zeros(self.n_rows, dtype=np.float32)
        rows, values = self.of(latent)
        out[rows] = values
        return out


def check_shown(latents, counts: dict[str, int], d_sae: int, k: int = 1) -> None:
    """What a ``sae show`` is asked to show, before any work: each latent asked is one of the ``d_sae`` (an integer:
    1.5 was latent 1, "3" latent 3), no count typed on the command line (``{"--random": 6, ...}``) is above them
    (99,999 random latents showed the 509 alive, silently), and ``k`` top examples are at least 1 (0 drew empty
    dashboards). A default count is "up to": a dictionary of 4 latents shows 4 of the default 6."""
    from mechscope.core.validate import check_int, typed_options

    if isinstance(latents, (str, bytes)) or not hasattr(latents, "__iter__"):
        raise MechscopeError(f"latents must be a list of latent indices (--latent, repeatable), got {latents!r}")
    for i in latents:
        if not 0 <= check_int(i, "--latent") < d_sae:
            raise MechscopeError(f"latent {i} out of range: the dictionary has latents 0..{d_sae - 1}")
    check_int(k, "--k", 1)
    typed = typed_options()
    for name, n in counts.items():
        if name in typed and n > d_sae:
            raise MechscopeError(f"{name} {n:,}: the dictionary has {d_sae:,} latents")


def densities(acts: LatentActivations) -> np.ndarray:
    """[d_sae] share of rows on which each latent fires."""
    return np.bincount(acts.latents, minlength=acts.d_sae) / max(acts.n_rows, 1)


def maxima(acts: LatentActivations) -> np.ndarray:
    """[d_sae] each latent's largest activation (0 for a latent that never fires)."""
    out = np.zeros(acts.d_sae, dtype=np.float64)
    if len(acts.values):
        np.maximum.at(out, acts.latents, acts.values.astype(np.float64))
    return out


@dataclass(frozen=True)
class LatentSummary(Result):
    """One latent over the sample (see the module docstring). Rows index the wing's sample."""

    SCHEMA: ClassVar[str | None] = None

    latent: int
    density: float
    max: float
    mean_when_active: float
    top_rows: tuple[int, ...]
    top_values: tuple[float, ...]
    band_edges: tuple[float, ...]  # quantile band limits of the nonzero activations (len bands + 1)
    band_rows: tuple[tuple[int, ...], ...]  # per band, the sampled rows (lowest band first)
    band_values: tuple[tuple[float, ...], ...]
    hist_counts: tuple[int, ...]
    hist_edges: tuple[float, ...]


def latent_summary(
    acts: LatentActivations, latent: int, *, k: int = 10, bands: int = 4, per_band: int = 4, bins: int = 30,
    seed: int = 0,
) -> LatentSummary:  # fmt: skip
    """The dashboard numbers of ``latent`` (see the module docstring); a seeded draw from each band."""
    rows, values = acts.of(latent)
    n = len(values)
    if n == 0:
        return LatentSummary(latent, 0.0, 0.0, 0.0, (), (), (), (), (), (), ())
    order = np.argsort(-values, kind="stable")[:k]
    edges = np.quantile(values.astype(np.float64), np.linspace(0, 1, bands + 1))
    g = np.random.default_rng(seed * 1_000_003 + latent)
    b_rows, b_values = [], []
    for i in range(bands):
        lo, hi = edges[i], edges[i + 1]
        inside = np.nonzero((values > lo) & (values <= hi) if i else (values >= lo) & (values <= hi))[0]
        pick = np.sort(g.choice(inside, size=min(per_band, len(inside)), replace=False)) if len(inside) else inside
        pick = pick[np.argsort(-values[pick], kind="stable")]
        b_rows.append(tuple(int(r) for r in rows[pick]))
        b_values.append(tuple(float(v) for v in values[pick]))
    counts, hedges = np.histogram(values, bins=bins, range=(0.0, float(values.max()) or 1.0))
    return LatentSummary(
        latent=int(latent),
        density=n / max(acts.n_rows, 1),
        max=float(values.max()),
        mean_when_active=float(values.mean()),
        top_rows=tuple(int(r) for r in rows[order]),
        top_values=tuple(float(v) for v in values[order]),
        band_edges=tuple(float(e) for e in edges),
        band_rows=tuple(b_rows),
        band_values=tuple(b_values),
        hist_counts=tuple(int(c) for c in counts),
        hist_edges=tuple(float(e) for e in hedges),
    )
