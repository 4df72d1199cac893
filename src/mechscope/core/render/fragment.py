"""A report page as one notebook fragment: scoped styles, unique ids, scripts in their own scope, folded sections.

The HTML reports are whole pages (``report/templates``). A notebook cell shows a *fragment* of a
page, several per notebook, so :func:`page_to_fragment` rewrites a rendered page:

* every ``id`` gets a prefix unique to this render (``ms3f2a…-tokens``), and so do the links to
  it (``href="#…"``) and the scripts' ``getElementById`` calls, so two renders never collide;
* the page's styles are scoped to the fragment's root element (``#ms3f2a… table {…}``), so they
  neither leak into the notebook nor into each other;
* each script runs inside its own function (no globals), after the elements it reads;
* the first section stays open and every later ``<h2>`` section is folded in a ``<details>``;
* sections that would take the fragment past :data:`MAX_CHARS` are left out and named, with the
  one call that writes the whole page.

No network: the pages inline their figures as ``data:`` URIs and carry no external reference.
"""

from __future__ import annotations

import html as html_lib
import itertools
import re
import uuid

MAX_CHARS = 1_000_000  # a notebook cell stays under ~1 MB of HTML; the rest is one save_html() away

_counter = itertools.count()


def new_uid() -> str:
    """An element id prefix unique to this render (and to this process)."""
    return f"ms{uuid.uuid4().hex[:8]}{next(_counter)}"


def scope_css(css: str, uid: str, idmap: dict[str, str]) -> str:
    """``css`` with every selector under ``#uid`` (``body``/``html`` become the root itself) and ids renamed."""

    def rule(m: re.Match) -> str:
        selectors = []
        for sel in m.group(1).split(","):
            sel = sel.strip()
            if not sel:
                continue
            sel = re.sub(r"#([A-Za-z_][\w-]*)", lambda k: "#" + idmap.get(k.group(1), k.group(1)), sel)
            root = re.match(r"(html|body)\b", sel)
            sel = re.sub(r"^(html|body)", f"#{uid}", sel) if root else f"#{uid} {sel}"
            selectors.append(sel)
        return ", ".join(selectors) + " {" + m.group(2) + "}"

    return re.sub(r"([^{}]+)\{([^{}]*)\}", rule, css)


def scoped_script(js: str, idmap: dict[str, str]) -> str:
    """``js`` in its own function scope, its ``getElementById`` calls pointed at the renamed ids."""

    def point(m: re.Match) -> str:
        return f'getElementById("{idmap.get(m.group(2), m.group(2))}")'

    js = re.sub(r"""getElementById\((["'])([^"']+)\1\)""", point, js)
    return "(function () {\n" + js.strip() + "\n})();"


_TAG_ID = re.compile(r"""(?<![\w-])id=(["'])([^"']+)\1""")  # not data-id= (\b matched after its "-")


def rename_ids(body: str, uid: str) -> tuple[str, dict[str, str]]:
    ids = list(dict.fromkeys(m.group(2) for m in _TAG_ID.finditer(body)))
    idmap = {i: f"{uid}-{i}" for i in ids}
    body = _TAG_ID.sub(lambda m: f'id="{idmap[m.group(2)]}"', body)
    body = re.sub(r"""\b(for|aria-labelledby|aria-describedby)=(["'])([^"']+)\2""",
                  lambda m: f'{m.group(1)}="{idmap.get(m.group(3), m.group(3))}"', body)  # fmt: skip
    # in-page links: to the renamed id, or to the same prefix when its section is not in the fragment
    body = re.sub(r'href="#([^"]*)"', lambda m: f'href="#{idmap.get(m.group(1), f"{uid}-{m.group(1)}")}"', body)
    return body, idmap


def split_sections(body: str) -> tuple[str, list[dict]]:
    """The part before the first ``<h2>``, and each ``<h2>`` section: its title, the h2's id and its content."""
    parts = re.split(r"(?=<h2[\s>])", body)
    sections = []
    for part in parts[1:]:
        m = re.match(r"<h2([^>]*)>(.*?)</h2>", part, re.S)
        if m is None:  # an unclosed heading: keep it as it is
            sections.append({"title": "", "id": None, "html": part, "content": part})
            continue
        id_m = _TAG_ID.search(m.group(1))
        sections.append({"title": m.group(2), "id": id_m.group(2) if id_m else None, "html": part,
                         "content": part[m.end():]})  # fmt: skip
    return parts[0], sections


def text_of(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html)).strip()


def page_to_fragment(
    page: str,
    *,
    open_sections: int = 1,
    keep_open: tuple[str, ...] = (),
    max_chars: int = MAX_CHARS,
    full_report: str = "result.save_html('report.html')",
    omitted: list[str] | None = None,
) -> str:
    """One self-contained fragment of a rendered report ``page`` (see the module docstring).

    ``keep_open``: titles of later sections shown open too; ``omitted``: titles of parts the caller left out
    before rendering (named in the note too).
    """
    uid = new_uid()
    styles = "\n".join(re.findall(r"<style[^>]*>(.*?)</style>", page, re.S))
    m = re.search(r"<body[^>]*>(.*)</body>", page, re.S)
    body = m.group(1) if m else page
    body = re.sub(r"<nav\b.*?</nav>", "", body, flags=re.S)  # page navigation: not part of a fragment
    body = re.sub(r"</?main\b[^>]*>", "", body)
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", body, re.S)
    body = re.sub(r"<script[^>]*>.*?</script>", "", body, flags=re.S)
    body, idmap = rename_ids(body, uid)
    head, sections = split_sections(body)

    out = [head]
    size = len(head) + len(styles) + sum(len(s) for s in scripts) + 2000
    left_out = list(omitted or [])
    for i, sec in enumerate(sections):
        if i < open_sections or html_lib.unescape(text_of(sec["title"])) in keep_open:  # titles as read
            piece = sec["html"]
        else:
            ident = f' id="{sec["id"]}"' if sec["id"] else ""
            piece = f'<details class="ms-section"{ident}><summary>{sec["title"]}</summary>{sec["content"]}</details>'
        if size + len(piece) > max_chars:
            left_out.append(text_of(sec["title"]) or f"section {i + 1}")
            continue
        out.append(piece)
        size += len(piece)
    if left_out:
        out.append(
            f'<p class="ms-omitted">Not shown here, to keep the notebook light: {", ".join(left_out)}. '
            f"The whole report: <code>{full_report}</code>.</p>"
        )
    html = "".join(out)
    present = {m.group(2) for m in _TAG_ID.finditer(html)}
    kept = []
    for js in scripts:
        wanted = re.findall(r"""getElementById\(["']([^"']+)["']\)""", js)
        if all(idmap.get(w, w) in present for w in wanted):  # a script whose elements were left out is dropped
            kept.append(scoped_script(js, idmap))
    css = scope_css(styles, uid, idmap) + FRAGMENT_CSS.replace("ROOT", uid)
    return (
        f'<div class="mechscope" id="{uid}"><style>{css}</style>{html}'
        + "".join(f"<script>{js}</script>" for js in kept)
        + "</div>"
    )


FRAGMENT_CSS = """
#ROOT { max-width: none; margin: .5em 0; }
#ROOT details.ms-section { margin: .4em 0; border-top: 1px solid #ddd; padding-top: .3em; }
#ROOT details.ms-section > summary { cursor: pointer; font-size: 1.15em; font-weight: 600; }
#ROOT .ms-omitted { color: #777; font-size: .9em; }
"""
