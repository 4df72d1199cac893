"""Small objects that show themselves in a notebook: an attention viewer, a table.

Both render plain HTML (and, for the viewer, one inline script scoped to its own root element):
no widget extension, no CDN; Jupyter, JupyterLab, VS Code and Colab draw them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import markupsafe
import numpy as np

from mechscope.core.errors import user_errors
from mechscope.core.render.fragment import new_uid
from mechscope.core.render.html import script_json

MAX_POSITIONS = 256  # the viewer's pattern grows with positions²; longer sequences show their first 256


def shown_token(t: str) -> str:
    return t.replace("\n", "↵").replace("\t", "⇥") or "∅"


class AttentionViewer:
    """One head's attention pattern over one sequence, drawn as tokens: hover a token and every earlier
    token is shaded by how much it attends there (the hover viewer of the heads report).

    ``pattern`` [query, key] (rows sum to 1), ``tokens`` the text of each position.
    """

    def __init__(self, tokens: Sequence[str], pattern, layer: int, head: int, title: str = "") -> None:
        p = np.asarray(pattern, dtype=np.float64)
        if p.ndim != 2 or p.shape[0] != p.shape[1] or p.shape[0] != len(tokens):
            raise ValueError(f"pattern {list(p.shape)} does not match {len(tokens)} tokens")
        self.tokens = [str(t) for t in tokens]
        self.pattern = p
        self.layer, self.head = int(layer), int(head)
        self.title = title or f"head {layer}.{head}"

    def __repr__(self) -> str:
        return f"AttentionViewer(head {self.layer}.{self.head}, {len(self.tokens)} tokens)"

    def weights(self, query: int) -> np.ndarray:
        """The attention from position ``query`` to every position (0 after it)."""
        return self.pattern[query]

    @user_errors
    def save_html(self, path):
        """Write the viewer as one self-contained page (its inline script; no network) to ``path``."""
        from mechscope.core.outputs import page_path, write_text_atomic
        from mechscope.core.render.html import with_footer

        path = page_path(path)
        title = markupsafe.escape(self.title)
        page = (f'<!doctype html><html><head><meta charset="utf-8"><title>{title}</title></head><body>'
                f"{self._repr_html_()}</body></html>")  # fmt: skip
        return write_text_atomic(path, with_footer(page))

    def _repr_html_(self) -> str:
        uid = new_uid()
        n = min(len(self.tokens), MAX_POSITIONS)
        rows = [[round(float(x), 4) for x in self.pattern[i, : i + 1]] for i in range(n)]  # causal: keys 0..i
        spans = "".join(
            f'<span class="tok" data-i="{i}" title="position {i}">{markupsafe.escape(shown_token(t))}</span>'
            for i, t in enumerate(self.tokens[:n])
        )
        more = (
            f'<p class="muted">The first {n} of {len(self.tokens)} positions are shown.</p>'
            if n < len(self.tokens)
            else ""
        )
        data = script_json(rows)
        return f"""<div class="mechscope ms-attn" id="{uid}">
<style>
#{uid} {{ font-family: system-ui, sans-serif; color: #222; margin: .4em 0; }}
#{uid} .tok {{ display: inline-block; padding: 1px 2px; margin: 1px; border-radius: 3px; font-family: monospace;
  font-size: .8em; cursor: default; white-space: pre; background: #f4f4f4; }}
#{uid} .tok.q {{ outline: 2px solid #d95f02; }}
#{uid} .muted {{ color: #777; font-size: .85em; }}
</style>
<p><b>{markupsafe.escape(self.title)}</b> <span class="muted">Hover over a token: the earlier tokens are shaded by
how much it attends to them (weights in each token's tooltip).</span></p>
<div class="ms-tokens">{spans}</div>
<p class="ms-readout muted">&nbsp;</p>{more}
<script>
(function () {{
  const root = document.getElementById("{uid}");
  const pat = {data};
  const toks = root.querySelectorAll("span.tok"), readout = root.querySelector(".ms-readout");
  function show(i) {{
    toks.forEach((o, j) => {{
      const a = j <= i ? pat[i][j] : 0;
      o.style.background = "rgba(217,95,2," + Math.min(1, a * 1.5).toFixed(3) + ")";
      o.classList.toggle("q", j === i);
      o.dataset.w = a.toFixed(4);
      o.title = "position " + j + ", attention from " + i + ": " + a.toFixed(3);
    }});
    root.dataset.query = String(i);
    const top = pat[i].map((a, j) => [a, j]).sort((x, y) => y[0] - x[0]).slice(0, 3);
    readout.textContent = "position " + i + " attends most to " +
      top.map(([a, j]) => j + " (" + toks[j].textContent + ") " + a.toFixed(3)).join(", ");
  }}
  root.querySelector(".ms-tokens").addEventListener("mouseover", (e) => {{
    const s = e.target.closest("span.tok");
    if (s && root.contains(s)) show(Number(s.dataset.i));
  }});
}})();
</script>
</div>"""


def _fmt(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return "—" if np.isnan(v) else f"{float(v):.3f}"
    return str(v)


class Table:
    """Rows of a result as a table: ``len``, iteration and indexing give plain dicts; shows itself in a notebook.

    ``table.rows`` is the list of dicts (``pandas.DataFrame(table.rows)`` if you use pandas).
    """

    def __init__(self, rows: Sequence[dict], columns: Sequence[str] | None = None, title: str = "",
                 max_rows: int = 40) -> None:  # fmt: skip
        self.rows = [dict(r) for r in rows]
        self.columns = list(columns) if columns is not None else list(dict.fromkeys(k for r in self.rows for k in r))
        self.title = title
        self.max_rows = max_rows

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def __repr__(self) -> str:
        shown = self.rows[: self.max_rows]
        widths = {c: max([len(c)] + [len(_fmt(r.get(c, ""))) for r in shown]) for c in self.columns}
        lines = [self.title] if self.title else []
        lines.append("  ".join(c.rjust(widths[c]) for c in self.columns))
        for r in self.rows[: self.max_rows]:
            lines.append("  ".join(_fmt(r.get(c, "")).rjust(widths[c]) for c in self.columns))
        if len(self.rows) > self.max_rows:
            lines.append(f"... {len(self.rows) - self.max_rows} more rows")
        return "\n".join(lines)

    def _html_rows(self, rows) -> str:
        return "".join(
            "<tr>" + "".join(f"<td>{markupsafe.escape(_fmt(r.get(c, '')))}</td>" for c in self.columns) + "</tr>"
            for r in rows
        )

    def _repr_html_(self) -> str:
        uid = new_uid()
        head = "<tr>" + "".join(f"<th>{markupsafe.escape(c.replace('_', ' '))}</th>" for c in self.columns) + "</tr>"
        shown, rest = self.rows[: self.max_rows], self.rows[self.max_rows :]
        more = (
            f"<details><summary>{len(rest)} more rows</summary><table>{head}{self._html_rows(rest)}</table></details>"
            if rest
            else ""
        )
        title = f"<p><b>{markupsafe.escape(self.title)}</b></p>" if self.title else ""
        return (
            f'<div class="mechscope ms-table" id="{uid}"><style>#{uid} table {{ border-collapse: collapse; '
            f"font-size: .85em; }} #{uid} td, #{uid} th {{ border: 1px solid #ddd; padding: .2em .5em; "
            f"text-align: right; }} #{uid} th {{ background: #f4f4f4; }}</style>{title}"
            f"<table>{head}{self._html_rows(shown)}</table>{more}</div>"
        )
