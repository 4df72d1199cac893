"""Figures and rows both wings' discovery and scrubbing reports share: the faithfulness curve of a circuit
(:class:`~mechscope.core.graphs.FaithfulnessCurve`) and the breakdown of a causal scrub
(:class:`~mechscope.core.scrub.ScrubResult`)."""

from __future__ import annotations

import textwrap

import numpy as np

from mechscope.core.render import layout as CL
from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri


def faithfulness_figure(curve, title: str = "") -> str | None:
    """The metric with the top edges kept against random circuits (a data URI), or None without a curve."""
    if curve is None:
        return None
    fig, ax = subplots(figsize=(6.5, 3.6), layout="constrained")
    CL.draw_faithfulness(ax, curve.fractions, curve.faithfulness, curve.random_mean, curve.random_sd,
                         curve.faithfulness_absolute, label=curve.method)  # fmt: skip
    ax.set_title(title or f"faithfulness of the top edges ({curve.method}, {curve.ablation} ablation)", fontsize=9)
    return figure_data_uri(fig)


def scrub_figure(scrub, title: str = "") -> str:
    """Behaviour recovered: the hypothesis, each claim alone (the rest clean) and the unclaimed edges alone."""
    names = ["hypothesis"] + [c.name for c in scrub.claims] + (["irrelevant edges"] if scrub.unclaimed else [])
    vals = [scrub.recovered] + [c.recovered for c in scrub.claims] + (
        [scrub.unclaimed.recovered] if scrub.unclaimed else [])  # fmt: skip
    width = 5.0 + 0.065 * max(len(n) for n in names)  # room for the claims' names beside the bars
    fig, ax = subplots(figsize=(width, 0.9 + 0.38 * len(names)), layout="constrained")
    y = np.arange(len(names))[::-1]
    ax.barh(y, vals, color=["#1b9e77"] + ["#7570b3"] * (len(names) - 1))
    for yi, v in zip(y, vals, strict=True):
        ax.text(v, yi, f" {v:.1%}", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.axvline(1.0, color="#999", lw=0.8, ls=":")
    ax.set_xlabel("recovered = (scrubbed − resampled) / (clean − resampled)", fontsize=8)
    ax.set_title(textwrap.fill(title or "causal scrubbing", 80), fontsize=9)
    return figure_data_uri(fig)


def scrub_rows(scrub) -> list[list]:
    """The scrub table: the hypothesis, each claim alone, the unclaimed edges alone (metric ± sd, recovered)."""
    rows = [["hypothesis (everything it does not claim resampled)", f"{scrub.metric_scrubbed:.4g} ± "
             f"{scrub.metric_scrubbed_sd:.2g}", f"{scrub.recovered:.1%}"]]  # fmt: skip
    rows += [[f"claim {c.name!r} alone (the rest clean)", f"{c.metric:.4g} ± {c.metric_sd:.2g}", f"{c.recovered:.1%}"]
             for c in scrub.claims]  # fmt: skip
    if scrub.unclaimed:
        u = scrub.unclaimed
        rows.append(["the unclaimed edges alone resampled", f"{u.metric:.4g} ± {u.metric_sd:.2g}",
                     f"{u.recovered:.1%}"])  # fmt: skip
    return rows
