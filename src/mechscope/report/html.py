"""Self-contained HTML: figures inlined as base64 PNG, styles and scripts inline, no network."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import jinja2
from matplotlib.figure import Figure


def figure_data_uri(fig: Figure, dpi: int = 100) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render(template: str, out: Path, **context) -> Path:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mechscope", "report/templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["tojson_safe"] = lambda obj: json.dumps(obj).replace("</", "<\\/")
    out.write_text(env.get_template(template).render(**context), encoding="utf-8")
    return out
