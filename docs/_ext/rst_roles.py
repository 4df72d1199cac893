"""A griffe extension for the API pages: mechscope's docstrings are prose with reST roles; show them as Markdown.

The docstrings are written for people reading the source: free prose, ``code`` in double backticks (which Markdown
reads as code too), and Sphinx roles such as :class:`~mechscope.core.errors.MechscopeError`, :func:`walk` or
:mod:`.results`. Markdown would print the roles as they are, so this rewrites each one, once the package is loaded,
into a code span that links to the object's API entry when the site documents it (an optional cross-reference:
no warning when it does not). A paragraph that ends with reST's ``::`` before an indented block ends with ``:``.

The source files are not changed; only the text the documentation site renders.
"""

from __future__ import annotations

import html
import re

import griffe

ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|obj|exc|const):`(~?)([^`<>]+?)`")
LITERAL = re.compile(r"(\S)::[ \t]*$", re.MULTILINE)  # "text::" -> "text:"
BARE_LITERAL = re.compile(r"^[ \t]*::[ \t]*$", re.MULTILINE)  # a line of its own: dropped


def _identifier(obj: griffe.Object, target: str) -> str | None:
    """The full dotted path ``target`` names, seen from ``obj`` (None when it cannot be told)."""
    if target.startswith("mechscope."):
        return target
    module = obj if obj.is_module else obj.module
    if target.startswith("."):  # relative to the module's package, as in an import
        level = len(target) - len(target.lstrip("."))
        package = module.path.split(".")
        if module.filepath is None or getattr(module.filepath, "name", "") != "__init__.py":
            package = package[:-1]  # a plain module: its package is its parent
        base = package[: len(package) - level + 1]
        return ".".join(base + [target.lstrip(".")])
    head, _, rest = target.partition(".")
    for scope in (obj, obj.parent, module):
        if scope is None:
            continue
        try:
            full = scope.resolve(head)
        except Exception:  # noqa: BLE001 - an unknown name stays plain code
            continue
        return f"{full}.{rest}" if rest else full
    return None


def _rewrite(obj: griffe.Object, text: str) -> str:
    def role(m: re.Match) -> str:
        tilde, target = m.group(2), m.group(3).strip()
        shown = target.rsplit(".", 1)[-1] if tilde else target.lstrip(".")
        code = f"<code>{html.escape(shown)}</code>"
        ident = _identifier(obj, target)
        if ident is None or not ident.startswith("mechscope"):
            return code
        return f'<autoref identifier="{html.escape(ident)}" optional>{code}</autoref>'

    text = ROLE.sub(role, text)
    text = BARE_LITERAL.sub("", text)
    return LITERAL.sub(r"\1:", text)


class RstRoles(griffe.Extension):
    """Rewrite the roles of every docstring of the loaded package."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        seen: set[int] = set()
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if obj.docstring is not None:
                obj.docstring.value = _rewrite(obj, obj.docstring.value)
            stack.extend(m for m in obj.members.values() if not m.is_alias)
