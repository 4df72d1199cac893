"""The training-dynamics report: series against step (log axis), phase change marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mechscope.core.render.figures import subplots
from mechscope.core.render.html import figure_data_uri, render


def _steps(series):
    return np.array([max(r["step"], 0.8) for r in series])  # step 0 drawn just left of 1 on the log axis


def _mark(ax, phase):
    if phase.get("detected"):
        ax.axvspan(*[max(s, 0.8) for s in phase["window"]], color="#d95f02", alpha=0.15, lw=0)


def run_figure(result: dict, title: str) -> str:
    s, phase = result["series"], result["phase_change"]
    x = _steps(s)
    layers = result["config"]["layers"]
    fig, axes = subplots(1, 4 if layers >= 2 else 3, figsize=(16 if layers >= 2 else 12, 3.4), layout="constrained")
    ax = axes[0]
    ax.plot(x[1:], [r["train_loss"] for r in s[1:]], label="train")
    ax.plot(x, [r["held_out_loss"] for r in s], label="held out")
    ax.set_title("loss")
    ax.set_ylabel("nats per token")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(x, [r["icl_score"] for r in s], color="black")
    ax.set_title("in-context learning score (late − early loss)")
    ax.set_ylabel("nats (negative: learns in context)")
    ax = axes[2]
    for h in range(len(s[0]["induction"][0])):
        ax.plot(x, [r["induction"][layers - 1][h] for r in s], label=f"induction {layers - 1}.{h}")
        ax.plot(x, [r["previous_token"][0][h] for r in s], ls="--", label=f"prev-token 0.{h}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("head scores on repeated random tokens")
    ax.set_ylabel("attention on the score's keys")
    ax.legend(fontsize=7, ncol=2)
    if layers >= 2:
        ax = axes[3]
        comp = np.array([r["k_composition"] for r in s])  # [T, H1, H0]
        ih, ph = result["circuit"]["induction_head"][1], result["circuit"]["previous_token_head"][1]
        for i in range(comp.shape[1]):
            for j in range(comp.shape[2]):
                strong = (i, j) == (ih, ph)
                ax.plot(
                    x,
                    comp[:, i, j],
                    color="#d95f02" if strong else "#bbb",
                    lw=2 if strong else 0.8,
                    label=f"0.{j} → 1.{i}" if strong else None,
                    zorder=3 if strong else 1,
                )
        ax.set_title("K-composition layer 0 → layer 1")
        ax.set_ylabel("K-composition (weights)")
        ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("step (log; step 0 drawn at 0.8)")
        ax.grid(alpha=0.3)
        _mark(ax, phase)
    fig.suptitle(
        title
        + (
            f" — phase change at steps {phase['window'][0]}–{phase['window'][1]} (shaded)"
            if phase.get("detected")
            else " — no phase change detected"
        ),
        fontsize=11,
    )
    return figure_data_uri(fig)


def _own_largest(result: dict) -> list[str]:
    """Where each of the two measures moved most on its own, when that is not the phase-change interval: the
    interval is where both moved together, and one can lead the other by a checkpoint."""
    s, p, top = result["series"], result["phase_change"], result["config"]["layers"] - 1
    steps = [r["step"] for r in s]
    ind = np.array([max(r["induction"][top]) for r in s])
    icl = np.array([r["icl_score"] for r in s])
    out = []
    for name, v, sign in (("highest induction score", ind, 1), ("in-context-learning score", icl, -1)):
        moves = sign * np.diff(v)
        i = int(np.argmax(moves))
        span = float(v.max() - v.min()) or 1.0
        if [steps[i], steps[i + 1]] != list(p["window"]):
            a, b = (steps.index(w) for w in p["window"])
            out.append(f"The {name} {'rose' if sign > 0 else 'fell'} most in another interval, steps "
                       f"{steps[i]}–{steps[i + 1]} ({moves[i]:.2f}, {moves[i] / span:.0%} of its range), against "
                       f"{sign * (v[b] - v[a]):.2f} in the phase-change interval.")  # fmt: skip
    return out


PHASE_SHARE, PHASE_JUMP = 0.2, 0.1  # lm.toy.detect_phase_change's criterion, as the page states it


def summary_lines(result: dict) -> list[str]:
    """The "What happened" sentences, from training.json's fields (``ToyTraining.series``)."""
    c, f, p = result["config"], result["final"], result["phase_change"]
    top = c["layers"] - 1
    if p.get("detected"):
        lines = [
            f"A phase change between steps {p['window'][0]} and {p['window'][1]}: in that one checkpoint interval the "
            f"highest layer-{top} induction score rose by {p['induction_jump']:.2f} and the in-context-learning score "
            f"fell by {-p['icl_jump']:.2f} nats, each at least {PHASE_SHARE:.0%} of its range over the run (and the "
            f"induction score by at least {PHASE_JUMP})."
        ] + _own_largest(result)
    elif "share_of_range" in p:
        lines = [
            f"No phase change was detected: in no checkpoint interval did the induction score and the "
            f"in-context-learning score both move at least {PHASE_SHARE:.0%} of their range with the induction score "
            f"rising by at least {PHASE_JUMP} (the interval where both moved most together: "
            f"{p['share_of_range']:.0%} of their range, induction {p['induction_jump']:+.2f}"
            + (f", under the {PHASE_JUMP} the induction score must rise" if p["induction_jump"] < PHASE_JUMP
               and p["share_of_range"] >= PHASE_SHARE else "")
            + ")."
        ]
    else:
        lines = [f"No phase change was looked for: {p.get('reason', 'too few checkpoints')}."]
    lines.append(
        f"At the end: highest induction score {f['max_induction_last_layer']:.2f} (layer {top}), highest "
        f"previous-token score {f['max_previous_token_layer0']:.2f} (layer 0), held-out loss "
        f"{f['held_out_loss']:.3f} nats, in-context-learning score {f['icl_score']:.3f}."
    )
    circ = result.get("circuit")
    if circ:
        last = result["series"][-1]
        (lp, hp), (li, hi) = circ["previous_token_head"], circ["induction_head"]
        heads = (f"The layer-0 head with the highest previous-token score at the end ({lp}.{hp}, "
                 f"{last['previous_token'][lp][hp]:.2f}) and the layer-1 head with the highest induction score "
                 f"({li}.{hi}, {last['induction'][li][hi]:.2f})")  # fmt: skip
        rng = circ.get("k_composition_range")
        series = circ.get("k_composition_series") or []
        if rng is None and series:
            rng = max(series) - min(series)
        jump = circ.get("k_composition_jump_at_phase_change")
        if p.get("detected") and jump is not None:
            lines.append(
                f"{heads}: their K-composition moved by {jump:+.3f} inside the phase-change interval, of a range of "
                f"{rng:.3f} over the whole run (a weight score; this page has no causal test that one feeds the other)."
            )
        elif rng is not None:
            lines.append(
                f"{heads}: their K-composition ranged over {rng:.3f} during the run (a weight score; no causal test "
                "here)."
            )
    ctl = result.get("control")
    if ctl:
        det = "a phase change was detected" if ctl["phase_change"].get("detected") else "no phase change was detected"
        lines.append(
            f"1-layer control: highest induction score {ctl['final']['max_induction_last_layer']:.2f} at the end; "
            f"{det}."
        )
    return lines


def write_training_report(result: dict, out: Path) -> Path:
    return render("mechscope.lm", "toy.html.j2", out, **report_context(result))


def report_context(result: dict) -> dict:
    """What toy.html.j2 draws (the file report and the notebook fragment)."""
    c = result["config"]
    kind = "attention-only model" if c.get("mlp", "none") == "none" else f"model with {c['mlp'].upper()} MLPs"
    figures = [run_figure(result, f"{c['layers']}-layer {kind}")]
    if result.get("control"):
        figures.append(run_figure(result["control"], "1-layer control"))
    return {"result": result, "figures": figures, "summary": summary_lines(result)}
