"""The induction-heads report: figures and a self-contained HTML page (no computation here)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mechscope.report.html import figure_data_uri, render  # noqa: E402

TITLES = {
    "induction": "induction score (repeated random tokens)",
    "prefix_matching": "prefix matching (Olsson et al.)",
    "previous_token": "previous-token score (random tokens)",
    "previous_token_text": "previous-token score (real text)",
    "duplicate_token": "duplicate-token score",
    "copying": "copying: direct effect on the attended token's logit",
    "ov_eigen_positivity": "OV eigenvalue positivity Σλ/Σ|λ|",
    "ablation_loss_increase": "mean-ablation: second-half loss increase",
    "zero_ablation_loss_increase": "zero-ablation: second-half loss increase",
}


def heatmaps(scores: dict[str, list]) -> list[tuple[str, str]]:
    out = []
    for name, title in TITLES.items():
        s = np.array([[np.nan if x is None else x for x in row] for row in scores[name]], dtype=float)  # [L, H]
        if np.isnan(s).all():
            continue
        fig, ax = plt.subplots(
            figsize=(max(4.0, 0.28 * s.shape[0] + 1.8), max(2.2, 0.3 * s.shape[1] + 1.2)), layout="constrained"
        )
        signed = np.nanmin(s) < 0
        vmax = np.nanmax(np.abs(s)) or 1.0
        im = ax.imshow(
            s.T, aspect="auto", cmap="RdBu_r" if signed else "viridis", vmin=-vmax if signed else 0, vmax=vmax
        )
        ax.set_xlabel("layer")
        ax.set_ylabel("head")
        ax.set_xticks(range(0, s.shape[0], max(1, s.shape[0] // 15)))
        ax.set_yticks(range(s.shape[1]))
        ax.set_title(title, fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.9)
        out.append((title, figure_data_uri(fig)))
    return out


def loss_plot(loss: list[float], n: int) -> str:
    fig, ax = plt.subplots(figsize=(8, 3.2), layout="constrained")
    ax.plot(range(len(loss)), loss, marker=".", lw=1)
    ax.axvline(n + 0.5, color="grey", ls="--")
    # x in data units, y as a fraction of the axes: placed the same whatever the loss values are
    ax.text(n * 0.5, 0.92, "first copy", ha="center", color="grey", transform=ax.get_xaxis_transform())
    ax.text(n * 1.5, 0.92, "second copy", ha="center", color="grey", transform=ax.get_xaxis_transform())
    ax.set_xlabel("position (predicting the next token)")
    ax.set_ylabel("loss (nats)")
    ax.set_title("loss per position on repeated random tokens")
    ax.grid(alpha=0.3)
    return figure_data_uri(fig)


def circuit_figure(result: dict) -> str:
    """Previous-token heads feeding induction heads, by layer; edge width = K-composition."""
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    n_layers = len(result["labels"])
    nodes = {}
    for comp in result["composition"]:
        ih = comp["induction_head"]
        nodes[(ih["layer"], ih["head"])] = "induction"
        for src in comp["previous_token_heads_feeding"]:
            nodes[(src["layer"], src["head"])] = nodes.get((src["layer"], src["head"]), "previous_token")
    by_layer: dict[int, list] = {}
    for layer, h in sorted(nodes):
        by_layer.setdefault(layer, []).append(h)
    pos = {(layer, h): (layer, i - (len(hs) - 1) / 2) for layer, hs in by_layer.items() for i, h in enumerate(hs)}
    widths = [s["k_composition"] for c in result["composition"] for s in c["previous_token_heads_feeding"]]
    wmax = max(widths) if widths else 1.0
    for comp in result["composition"]:
        t = (comp["induction_head"]["layer"], comp["induction_head"]["head"])
        for src in comp["previous_token_heads_feeding"]:
            a = pos[(src["layer"], src["head"])]
            b = pos[t]
            ax.annotate(
                "",
                xy=b,
                xytext=a,
                arrowprops=dict(arrowstyle="->", lw=0.5 + 4 * src["k_composition"] / wmax, color="#888", alpha=0.8),
            )
    for (layer, h), kind in nodes.items():
        x, y = pos[(layer, h)]
        ax.scatter([x], [y], s=500, color="#d95f02" if kind == "induction" else "#1b9e77", zorder=3)
        ax.text(x, y, f"{layer}.{h}", ha="center", va="center", fontsize=7, color="white", zorder=4)
    ax.set_xlim(-1, n_layers)
    ax.set_xlabel("layer")
    ax.set_yticks([])
    ax.set_title("circuit: previous-token heads (green) → induction heads (orange); width = K-composition")
    if not nodes:
        ax.text(n_layers / 2, 0, "no induction heads found", ha="center")
    return figure_data_uri(fig)


def summary(result: dict) -> list[str]:
    """Sentences written from the measured numbers."""
    s = result["scores"]
    lines = []
    f, sec = result["loss_first_half"], result["loss_second_half"]
    lines.append(
        f"On repeated random tokens the model's loss falls from {f:.2f} nats on the first copy to {sec:.2f} on the "
        f"second: it {'uses' if sec < 0.5 * f else 'barely uses'} the earlier copy to predict the next token."
    )
    ind = result["induction_heads"]
    t = result["thresholds"]
    if ind:
        names = ", ".join(f"{h['layer']}.{h['head']} ({h['score']:.2f})" for h in ind[:6])
        lines.append(
            f"{len(ind)} heads meet the induction criterion (induction and prefix-matching scores ≥ {t['induction']}): "
            f"{names}{', …' if len(ind) > 6 else ''}."
        )
    else:
        best = max(
            (s["induction"][layer][h], layer, h)
            for layer in range(len(s["induction"]))
            for h in range(len(s["induction"][0]))
        )
        lines.append(
            f"No head meets the induction criterion; the highest induction score is {best[0]:.2f} "
            f"(head {best[1]}.{best[2]})."
        )
    prev = result["previous_token_heads"]
    if prev:
        names = ", ".join(f"{h['layer']}.{h['head']} ({h['score']:.2f})" for h in prev[:5])
        lines.append(f"{len(prev)} previous-token heads (score ≥ {t['previous_token']}): {names}.")
    k = result["top_k_ablation"]
    lines.append(
        f"Mean-ablating the {k['k']} heads with the highest induction scores together raises the second-half loss by "
        f"{k['induction_heads_loss_increase']:.2f} nats; {k['k']} random heads raise it by "
        f"{k['random_heads_loss_increase_mean']:.2f} ± {k['random_heads_loss_increase_std']:.2f} "
        f"({len(k['random_draws'])} draws)."
    )
    for comp in result["composition"][:3]:
        ih = comp["induction_head"]
        feeders = comp["previous_token_heads_feeding"]
        if feeders:
            src = ", ".join(f"{r['layer']}.{r['head']} (K-comp {r['k_composition']:.3f})" for r in feeders[:3])
            lines.append(
                f"Induction head {ih['layer']}.{ih['head']} reads its keys from previous-token heads {src}; the mean "
                f"K-composition over all earlier heads is {comp['k_composition_mean']:.3f}."
            )
    return lines


def write_report(result: dict, examples: dict, token_text: dict[str, list[str]], out: Path) -> Path:
    n = result["protocol"]["n"]
    table_scores = [
        "induction",
        "prefix_matching",
        "previous_token",
        "duplicate_token",
        "copying",
        "ov_eigen_positivity",
        "ablation_loss_increase",
    ]
    s = result["scores"]
    flat = sorted(
        (
            (s["induction"][layer][h], layer, h)
            for layer in range(len(s["induction"]))
            for h in range(len(s["induction"][0]))
        ),
        reverse=True,
    )
    rows = [
        {"head": f"{layer}.{h}", "label": result["labels"][layer][h], **{k: s[k][layer][h] for k in table_scores}}
        for _, layer, h in flat[:20]
    ]
    viewer = {
        name: {"tokens": token_text[name], "patterns": data["patterns"]}
        for name, data in examples.items()
        if name in ("repeated", "text")
    }
    return render(
        "heads.html.j2",
        out,
        result=result,
        summary=summary(result),
        heatmaps=heatmaps(result["scores"]),
        loss_png=loss_plot(result["loss_per_position"], n),
        circuit_png=circuit_figure(result),
        rows=rows,
        table_scores=table_scores,
        viewer=viewer,
        heads=examples["heads"],
    )
