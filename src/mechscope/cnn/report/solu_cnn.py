"""The report of ``cnn solu-compare``: accuracy and the class selectivity of conv channels per activation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri, render

COLOURS = {"relu": "#1b9e77", "gelu": "#7570b3", "solu": "#d95f02"}


def summary_lines(result: dict) -> list[str]:
    """Sentences from the numbers of compare.json."""
    rows = result["models"]
    lines = [
        "Test accuracy: " + ", ".join(f"{r['activation']} {r['test_accuracy']:.4f}" for r in rows) + "."
    ]
    for i, st in enumerate(rows[0]["stages"]):
        parts = []
        for r in rows:
            s = r["stages"][i]
            if s["median"] is None:
                parts.append(f"{r['activation']}: every channel silent")
                continue
            live = st["channels"] - s["silent"]
            of = f"of the {live} that respond" if s["silent"] else f"of the {live}"
            parts.append(
                f"{r['activation']} median {s['median']:.2f} ({round(s['share_ge_0.5'] * live)} {of} ≥ 0.5, "
                f"{100 * s['share_ge_0.5']:.0f}%" + (f"; {s['silent']} silent, left out" if s["silent"] else "") + ")"
            )
        lines.append(f"Class selectivity of {st['stage']}'s {st['channels']} channels: " + "; ".join(parts) + ".")
    return lines


def histogram_figure(stages: dict) -> str:
    """One panel per stage: the selectivity index of its channels, one colour per activation."""
    names = [s.stage for s in next(iter(stages.values()))]
    fig, axes = subplots(1, len(names), figsize=(5.5 * len(names), 3.4), layout="constrained", squeeze=False)
    bins = np.linspace(0, 1, 21)
    for j, name in enumerate(names):
        ax = axes[0, j]
        for act, found in stages.items():
            s = found[j]
            live = np.setdiff1d(np.arange(len(s.index)), list(s.silent))
            v = s.index.numpy()[live]
            ax.hist(v, bins=bins, histtype="step", lw=2, color=COLOURS.get(act, "#333"),
                    label=f"{act} (median {np.median(v):.2f})" if len(v) else f"{act} (all silent)")  # fmt: skip
        ax.set_title(f"{name}: class selectivity of its channels")
        ax.set_xlabel("(μmax − μrest) / (μmax + μrest), class means shifted to a minimum of 0")
        ax.set_ylabel("channels")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure_data_uri(fig)


def profile_figure(stages: dict, class_names: list[str]) -> str:
    """Class-mean profiles (rows: channels sorted by preferred class, then index) of the last stage."""
    acts = list(stages)
    fig, axes = subplots(1, len(acts), figsize=(4.2 * len(acts), 5), layout="constrained", squeeze=False)
    for j, act in enumerate(acts):
        s = stages[act][-1]
        cm = s.class_means.numpy()
        shifted = cm - cm.min(1, keepdims=True)
        norm = shifted / np.maximum(shifted.max(1, keepdims=True), 1e-12)
        order = sorted(range(len(cm)), key=lambda c: (int(cm[c].argmax()), -float(s.index[c])))
        ax = axes[0, j]
        ax.imshow(norm[order], aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{act}: {s.stage}, class means (row-normalised)", fontsize=9)
        ax.set_xticks(range(len(class_names)))
        ax.set_xticklabels(class_names, fontsize=7, rotation=90 if len(class_names) > 12 else 0)
        ax.set_yticks([])
        ax.set_ylabel("channels, by preferred class")
    return figure_data_uri(fig)


def _channel(s, c: int, class_names: list[str]) -> dict:
    return {"channel": c, "index": float(s.index[c]), "explain": float(s.explain_index[c]),
            "preferred": class_names[s.preferred_class[c]]}  # fmt: skip


def channel_rows(found, class_names: list[str], n: int = 10) -> list[dict]:
    """Per stage, the ``n`` most and least selective channels, side by side."""
    out = []
    for s in found:
        silent = set(s.silent)
        order = sorted((c for c in range(len(s.index)) if c not in silent), key=lambda c, s=s: -float(s.index[c]))
        most = [_channel(s, c, class_names) for c in order[:n]]
        least = [_channel(s, c, class_names) for c in order[::-1][:n]]
        out.append({"stage": s.stage, "pairs": list(zip(most, least, strict=True)), "silent": sorted(silent)})
    return out


def write_report(result: dict, stages: dict, out: Path) -> Path:
    names = result["class_names"]
    return render(
        "mechscope.cnn", "solu_cnn.html.j2",
        out,
        result=result,
        histogram=histogram_figure(stages),
        profiles=profile_figure(stages, names),
        channels={act: channel_rows(found, names) for act, found in stages.items()},
    )
