"""Self-contained HTML: figures inlined as base64 PNG, styles and scripts inline, no network."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import jinja2
import markupsafe
from matplotlib.figure import Figure


def figure_data_uri(fig: Figure, dpi: int = 100) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render(template: str, out: Path, **context) -> Path:
    out.write_text(render_string(template, **context), encoding="utf-8")
    return out


def render_string(template: str, **context) -> str:
    """The page ``template`` renders to, as a string (notebooks make fragments of it)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("mechscope", "report/templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    # JSON for a <script> block: not HTML-escaped (quotes must stay quotes), but "</" is broken up
    # so that no string in the data can close the script element
    env.filters["tojson_safe"] = lambda obj: markupsafe.Markup(json.dumps(obj).replace("</", "<\\/"))
    return env.get_template(template).render(**context)
