"""The clip room in a notebook: a renderer per result type, registered with :mod:`mechscope.core.show`.

Each renderer returns the whole report page (the template of :mod:`mechscope.clip.report`); the registry turns it
into a notebook fragment (``_repr_html_``) or writes it (``save_html``).
"""

from __future__ import annotations

from mechscope.clip.methods.attack import AttackResult
from mechscope.clip.methods.evaluate import InspectResult, TrainResult
from mechscope.clip.methods.neurons import NeuronsResult
from mechscope.core.render.html import render_string
from mechscope.core.show import renders


@renders(TrainResult, keep_open=("What it learned",))
def train_page(result: TrainResult, full: bool = True) -> str:
    from mechscope.clip.report.context import train_context

    return render_string("mechscope.clip", "train.html.j2", **train_context(result))


@renders(InspectResult)
def inspect_page(result: InspectResult, full: bool = True) -> str:
    from mechscope.clip.report.context import inspect_context

    return render_string("mechscope.clip", "inspect.html.j2", **inspect_context(result))


@renders(NeuronsResult, keep_open=("Summary",))
def neurons_page(result: NeuronsResult, full: bool = True) -> str:
    from mechscope.clip.report.context import neurons_context

    return render_string("mechscope.clip", "neurons.html.j2", **neurons_context(result))


@renders(AttackResult, keep_open=("Summary",))
def attack_page(result: AttackResult, full: bool = True) -> str:
    from mechscope.clip.report.context import attack_context

    return render_string("mechscope.clip", "attack.html.j2", **attack_context(result))
