"""Self-contained HTML: figures inlined as base64 PNG, styles and scripts inline, no network.

The one PNG-to-data-URI encoder (:func:`png_uri`) and its three doors (a matplotlib figure, a PNG file, an
image array), and the Jinja2 rendering of each wing's templates (``mechscope/<wing>/report/templates``).
"""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path

import jinja2
import markupsafe
import numpy as np
from matplotlib.figure import Figure

_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026"})


def script_json(obj, allow_nan: bool = True) -> str:
    """``obj`` as JSON to put inside a ``<script>``: <, > and & written as \\u escapes (the same values once parsed),
    so no text in it (a token "</script>", "<!--<script>") can close the script or change how HTML reads it."""
    return json.dumps(obj, allow_nan=allow_nan).translate(_SCRIPT_SAFE)


def png_uri(png: bytes) -> str:
    """PNG bytes as a ``data:`` URI (the page needs no file beside it)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """A matplotlib figure (built without pyplot) as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def figure_data_uri(fig: Figure, dpi: int = 100) -> str:
    """A matplotlib figure as a PNG data URI."""
    return png_uri(figure_png(fig, dpi))


def file_uri(path) -> str:
    """A PNG file as a data URI."""
    return png_uri(Path(path).read_bytes())


def array_uri(img: np.ndarray, scale: int = 3) -> str:
    """[H, W] or [H, W, 3] in [0, 1] as an upscaled (nearest) PNG data URI."""
    from PIL import Image

    a = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    a = a.repeat(scale, 0).repeat(scale, 1)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return png_uri(buf.getvalue())


@functools.lru_cache(maxsize=8)
def environment(package: str) -> jinja2.Environment:
    """The Jinja2 environment of one package's ``report/templates`` (``mechscope.cnn`` or ``mechscope.lm``), then
    the pages both wings draw the same way (``mechscope/core/render/templates``: causal scrubbing's)."""
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([jinja2.PackageLoader(package, "report/templates"),
                                    jinja2.PackageLoader("mechscope.core.render", "templates")]),
        autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    # JSON for a <script> block: not HTML-escaped (quotes must stay quotes); script_json escapes <, > and &
    env.filters["tojson_safe"] = lambda obj: markupsafe.Markup(script_json(obj))
    env.filters["shown"] = shown_value
    return env


def counted(n: int, one: str, many: str | None = None) -> str:
    """A count and its noun, singular for one: '1 row', '2 rows', '1,024 backward passes' (``many``: an irregular
    plural; by default ``one`` + "s")."""
    return f"{n:,} {one if n == 1 else (many or one + 's')}"


def shown_value(v) -> str:
    """A setting as a person reads it: integers with thousands separators, floats to 4 significant figures,
    tuples and lists as comma lists, None as a dash (not Python's reprs: "(0.5,)", "None", 0.00392156862745098)."""
    if v is None:
        return "—"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.4g}"
    if isinstance(v, (tuple, list)):
        return ", ".join(shown_value(x) for x in v)
    return str(v)


def render_string(package: str, template: str, **context) -> str:
    """The page ``template`` of ``package`` renders to, as a string (notebooks make fragments of it)."""
    return environment(package).get_template(template).render(**context)


def render(package: str, template: str, out: Path, **context) -> Path:
    """Render ``template`` of ``package`` into the file ``out``, with the footer that says what made it."""
    out.write_text(with_footer(render_string(package, template, **context)), encoding="utf-8")
    return out


FOOTER_STYLE = "margin: 2.5em 0 1em; color: #777; font-size: 12px"


def made_by() -> str:
    """The footer of a report page: what made it (mechscope, Python and the numeric libraries, as every JSON record's
    ``versions`` entry says them)."""
    from mechscope.core.outputs import versions

    shown = " · ".join(f"{name} {v}" for name, v in versions().items())
    return f'<footer class="made-by" style="{FOOTER_STYLE}">Made by {markupsafe.escape(shown)}.</footer>'


def with_footer(page: str) -> str:
    """A whole page with :func:`made_by` before its closing ``</body>`` (at the end when it has none)."""
    head, body_end, tail = page.rpartition("</body>")
    if not body_end:
        return page + made_by()
    return f"{head}{made_by()}\n{body_end}{tail}"
