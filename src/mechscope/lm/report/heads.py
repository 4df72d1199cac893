"""The induction-heads report: figures, sentences and a self-contained HTML page (no computation).

Every sentence is written from a field of :class:`~mechscope.lm.methods.heads.HeadsResult`, and
every number in it appears in a table or figure of the page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch
from matplotlib.path import Path as MPath

from mechscope.core.render import layout as CL
from mechscope.core.render.html import figure_data_uri, render

TITLES = {
    "induction": "induction score (repeated random tokens)",
    "prefix_matching": "prefix matching (Olsson et al.)",
    "previous_token": "previous-token score (random tokens)",
    "previous_token_text": "previous-token score (real text)",
    "duplicate_token": "duplicate-token score",
    "copying": "copying: centred direct effect on the attended token's logit",
    "ov_eigen_positivity": "OV eigenvalue positivity Σλ/Σ|λ| (folded weights)",
    "ablation_loss_increase": "mean-ablation: second-half loss increase",
    "zero_ablation_loss_increase": "zero-ablation: second-half loss increase",
    "resample_ablation_loss_increase": "resample-ablation: second-half loss increase",
}
TABLE_SCORES = (
    "induction",
    "prefix_matching",
    "previous_token",
    "duplicate_token",
    "copying",
    "ov_eigen_positivity",
    "ablation_loss_increase",
)
KIND_TEXT = {
    "mean": "mean-ablation (each position's head output replaced by its mean at that position over the batch)",
    "zero": "zero-ablation (head output set to 0)",
    "resample": "resample-ablation (head output taken from another sequence of the batch, same position)",
}


def layer_head_figure(values: np.ndarray, title: str, signed: bool | None = None) -> str:
    """A [layers, heads] map; diverging colours around 0 when the values are signed."""
    s = np.asarray(values, dtype=float)
    signed = bool(np.nanmin(s) < 0) if signed is None else signed
    fig = Figure(figsize=(max(4.0, 0.28 * s.shape[0] + 1.8), max(2.2, 0.3 * s.shape[1] + 1.2)), layout="constrained")
    ax = fig.subplots()
    vmax = float(np.nanmax(np.abs(s))) or 1.0
    im = ax.imshow(s.T, aspect="auto", cmap="RdBu_r" if signed else "viridis", vmin=-vmax if signed else 0, vmax=vmax)
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_xticks(range(0, s.shape[0], max(1, s.shape[0] // 15)))
    ax.set_yticks(range(s.shape[1]))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.9)
    return figure_data_uri(fig)


def heatmaps(scores: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """Every score that was measured, as a [layers, heads] map."""
    return [
        (title, layer_head_figure(scores[name], title))
        for name, title in TITLES.items()
        if not np.isnan(np.asarray(scores[name], dtype=float)).all()
    ]


def loss_plot(loss: list[float], n: int) -> str:
    fig = Figure(figsize=(8, 3.2), layout="constrained")
    ax = fig.subplots()
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


def group_label(layer: int, heads: list[int]) -> str:
    return f"{layer}." + "/".join(str(h) for h in heads)


def circuit_graph(result) -> tuple[list, list[dict]]:
    """Nodes ("src", layer, head) and ("kv", layer, kv_head), and one edge per confirmed path patch."""
    edges = []
    for pp in result.path_patches:
        if not any(pp.confirmed):
            continue
        confirmed = [h for h, ok in zip(pp.query_heads, pp.confirmed, strict=True) if ok]
        drops = [float(d) for d, ok in zip(pp.drop, pp.confirmed, strict=True) if ok]
        edges.append(
            {
                "a": ("src", *pp.source),
                "b": ("kv", pp.layer, pp.kv_head),
                "confirmed": confirmed,
                "drop": max(drops),
                "loss": pp.loss_increase,
                "patch": pp,
            }
        )
    nodes = list(dict.fromkeys([e["a"] for e in edges] + [e["b"] for e in edges]))
    return nodes, edges


def node_text(node, result) -> str:
    kind, layer, idx = node
    if kind == "src":
        return f"{layer}.{idx}"
    g = result.kv_groups
    heads = [h for h in range(idx * g, (idx + 1) * g) if result.labels[layer][h] == "induction"]
    return group_label(layer, heads or list(range(idx * g, (idx + 1) * g)))


def circuit_figure(result) -> str:
    """Path-patching-confirmed edges only; width = drop in the target's induction score."""
    nodes, edges = circuit_graph(result)
    if not nodes:
        fig = Figure(figsize=(6, 1.5), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no edge confirmed by path patching", ha="center", va="center")
        return figure_data_uri(fig)
    lay = CL.layout(nodes, [(e["a"], e["b"]) for e in edges], layer_of=lambda n: n[1])
    curves = [
        CL.trimmed_curve(lay.pos[e["a"]], lay.pos[e["b"]], lay.bends[(e["a"], e["b"])], lay.radius + 0.03)
        for e in edges
    ]
    xs = [p[0] for p in lay.pos.values()]
    every = np.concatenate([np.asarray(list(lay.pos.values()))] + curves)
    lo, hi = every.min(0) - 0.8, every.max(0) + 0.8
    w, h = hi - lo
    fig = Figure(figsize=(min(14, 1.0 + 0.9 * w), 1.2 + 0.9 * h), layout="constrained")
    ax = fig.subplots()
    for e, pts in zip(edges, curves, strict=True):
        path = MPath(pts, [MPath.MOVETO] + [MPath.LINETO] * (len(pts) - 1))
        ax.add_patch(FancyArrowPatch(path=path, arrowstyle="-|>", mutation_scale=12, lw=0.8 + 5 * e["drop"],
                                     color="#777", alpha=0.85, zorder=1))
        mid = pts[len(pts) // 2]
        ax.text(mid[0], mid[1] + 0.12, f"−{e['drop']:.2f}", fontsize=7, ha="center", color="#444", zorder=2)
    for node, (x, y) in lay.pos.items():
        colour = "#1b9e77" if node[0] == "src" else "#d95f02"
        ax.add_patch(Circle((x, y), lay.radius, color=colour, zorder=3))
        ax.text(x, y, node_text(node, result), ha="center", va="center", fontsize=7, color="white", zorder=4)
    ax.set_aspect("equal")
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_xticks(sorted(set(xs)))
    ax.set_xticklabels([str(layer) for layer in lay.columns])
    ax.set_xlabel("layer")
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(
        "edges confirmed by key-side path patching: source head (green) → key/value head of induction heads "
        "(orange);\nlabel and width: drop in the target's induction score",
        fontsize=9,
    )
    return figure_data_uri(fig)


def agreement_figure(ablation) -> str | None:
    """Attribution-patching estimate against the exact measurement, for the heads measured both ways."""
    keys = sorted(ablation.exact_mean)
    if len(keys) < 2:
        return None
    est = [ablation.measured_estimate[lh] for lh in keys]
    ex = [ablation.exact_mean[lh] for lh in keys]
    fig = Figure(figsize=(4.4, 4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(est, ex, s=18)
    for (layer, h), a, b in zip(keys, est, ex, strict=True):
        ax.annotate(f"{layer}.{h}", (a, b), fontsize=6, xytext=(2, 2), textcoords="offset points")
    lo, hi = min(est + ex), max(est + ex)
    ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax.set_xlabel("attribution-patching estimate (nats)")
    ax.set_ylabel("measured (nats)")
    ax.set_title(f"{ablation.kind}-ablation: estimate vs measurement", fontsize=10)
    ax.grid(alpha=0.3)
    return figure_data_uri(fig)


def _heads(rows, key="score", n=6) -> str:
    return ", ".join(f"{r['layer']}.{r['head']} ({r[key]:.2f})" for r in rows[:n]) + (", …" if len(rows) > n else "")


def summary(result) -> list[str]:
    """Sentences written from the measured numbers."""
    s, t = result.scores, result.protocol["thresholds"]
    lines = []
    f, sec = result.loss_first_half, result.loss_second_half
    lines.append(
        f"On repeated random tokens the model's loss falls from {f:.2f} nats on the first copy to {sec:.2f} on the "
        f"second: it {'uses' if sec < 0.5 * f else 'barely uses'} the earlier copy to predict the next token."
    )
    ind = result.ranked("induction", "induction")
    if ind:
        lines.append(
            f"{len(ind)} heads are induction heads by Olsson et al.'s two properties (prefix-matching score ≥ "
            f"{t['induction']} and positive copying, centred): {_heads(ind)} (induction score in brackets)."
        )
    else:
        best = np.unravel_index(np.argmax(s["induction"]), s["induction"].shape)
        lines.append(
            f"No head is an induction head by prefix matching and copying; the highest induction score is "
            f"{s['induction'][best]:.2f} (head {best[0]}.{best[1]})."
        )
    near = [
        (lay, h)
        for lay, h in zip(*np.nonzero(s["prefix_matching"] >= t["induction"]), strict=True)
        if s["copying"][lay, h] <= 0
    ]
    if near:
        names = ", ".join(f"{lay}.{h} ({s['copying'][lay, h]:+.2f})" for lay, h in near[:5])
        lines.append(f"Prefix matching without positive copying, so not labelled induction: {names}.")
    prev = result.ranked("previous_token", "previous_token")
    if prev:
        lines.append(f"{len(prev)} previous-token heads (score ≥ {t['previous_token']}): {_heads(prev, n=5)}.")
    lines += ablation_sentences(result)
    lines += circuit_sentences(result)
    return lines


def ablation_sentences(result) -> list[str]:
    k = result.top_k_ablation
    lines = [
        f"Mean-ablating the {k['k']} heads with the highest induction scores together (each position's output "
        f"replaced by its mean over the {result.protocol['batch']} sequences) raises the second-half loss by "
        f"{k['induction_heads_loss_increase']:.2f} nats; {k['k']} random heads raise it by "
        f"{k['random_heads_loss_increase_mean']:.2f} ± {k['random_heads_loss_increase_std']:.2f} "
        f"({len(k['random_draws'])} draws)."
    ]
    mean = result.ablation["mean"]
    if mean.exact_mean:
        best = sorted(mean.exact_mean.items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{lay}.{h} (+{v:.2f} ± {mean.exact_std[(lay, h)]:.2f})" for (lay, h), v in best)
        ag = mean.agreement()
        corr = "" if ag.get("pearson") is None else f"Pearson r = {ag['pearson']:.2f}, "
        lines.append(
            f"One head at a time, mean-ablation costs most for {top} nats (mean ± sd over the sequences). "
            f"{len(mean.exact_mean)} heads were measured exactly (those with the largest estimated effects and a "
            f"random sample); every other head's value is a first-order estimate by attribution patching, which on the "
            f"measured heads agrees with {corr}median error {ag['median_abs_error']:.3f} nats."
        )
    return lines


def circuit_sentences(result) -> list[str]:
    lines = []
    crit = result.criterion
    _, edges = circuit_graph(result)
    g = result.kv_groups
    for e in edges[:8]:
        pp = e["patch"]
        heads = [f"{pp.layer}.{h}" for h in pp.query_heads]
        shared = f" (one key/value head shared by {', '.join(heads)}: one test)" if g > 1 else ""
        change = "; ".join(
            f"{pp.layer}.{h} {c:.2f} → {q:.2f}"
            for h, c, q, ok in zip(pp.query_heads, pp.induction_clean, pp.induction_patched, pp.confirmed, strict=True)
            if ok
        )
        loss = "" if e["loss"] is None else f", and the second-half loss rises by {e['loss']:.2f} nats"
        lines.append(
            f"Removing head {pp.source[0]}.{pp.source[1]}'s output from the keys of {node_text(e['b'], result)}"
            f"{shared} only: induction score {change}{loss}."
        )
    weak = []
    for row in result.circuit():
        ih = row["induction_head"]
        for top in row["top_k_composition"][:2]:
            test = next((t for t in row["path_patching"] if t["source"] == top["head"]), None)
            if test is not None and test["drop"] < crit.min_drop:
                weak.append(
                    f"{top['head']} → {ih['layer']}.{ih['head']} (K-composition {top['k_composition']:.3f}, among its "
                    f"two highest; induction {test['induction_clean']:.2f} → {test['induction_patched']:.2f})"
                )
    if weak:
        lines.append(
            "A high K-composition is not evidence of use: removing the source from the keys barely moves the "
            "target in " + "; ".join(weak[:3]) + "."
        )
    lines.append(
        f"An edge is drawn only when the target's induction score drops by at least {crit.min_drop} and by at least "
        f"{crit.min_share:.0%} of its clean value; the tables below list every pair tested, confirmed or not."
    )
    return lines


def table_rows(result, n: int = 20) -> list[dict]:
    s = result.scores
    order = np.argsort(-s["induction"].ravel())[:n]
    H = s["induction"].shape[1]
    spread = result.ablation["mean"].spread()
    rows = []
    for i in order:
        layer, h = divmod(int(i), H)
        rows.append(
            {
                "head": f"{layer}.{h}",
                "label": result.labels[layer][h],
                **{k: float(s[k][layer, h]) for k in TABLE_SCORES},
                "ablation_sd": float(spread[layer, h]),
                "measured": (layer, h) in result.ablation["mean"].exact_mean,
            }
        )
    return rows


def token_texts(result) -> dict[str, list[str]]:
    """The text of each example sequence's tokens (their ids where the result holds no text)."""
    text = result.token_text or {}
    return {k: text.get(k) or [str(i) for i in v["tokens"]] for k, v in (result.examples or {}).items()
            if k in ("repeated", "text")}  # fmt: skip


def write_report(result, out: Path) -> Path:
    return render("mechscope.lm", "heads.html.j2", out, **report_context(result))


def report_context(result, token_text: dict[str, list[str]] | None = None) -> dict:
    """What heads.html.j2 draws (the file report and the notebook fragment)."""
    token_text = token_text if token_text is not None else token_texts(result)
    viewer = {
        name: {"tokens": token_text[name], "patterns": data["patterns"]}
        for name, data in (result.examples or {}).items()
        if name in ("repeated", "text")
    }
    d = result.to_dict()
    return dict(
        result=d,
        summary=summary(result),
        heatmaps=heatmaps(result.scores),
        loss_png=loss_plot(result.loss_per_position, result.protocol["n"]),
        circuit_png=circuit_figure(result),
        agreement_png=agreement_figure(result.ablation["mean"]),
        kinds=KIND_TEXT,
        rows=table_rows(result),
        table_scores=TABLE_SCORES,
        viewer=viewer,
        heads=(result.examples or {}).get("heads", []),
    )
