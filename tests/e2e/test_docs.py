"""The documentation: a README that fits a screen or two, and a site that builds with ``--strict`` (a broken link,
a missing page or an API page whose module does not import fails)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_readme_is_short_and_links_the_docs():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) < 200
    text = "\n".join(lines)
    assert "make demo" in text and "make test" in text and "docs/" in text
    for target in ("docs/getting-started.md", "ARCHITECTURE.md", "docs/findings.md"):
        assert (REPO / target).is_file() and f"({target}" in text


def test_architecture_states_the_rule():
    text = (REPO / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert "core" in text and "test_architecture.py" in text


def test_site_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]'; `make test` installs it)")
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    site = tmp_path / "site"
    assert (site / "index.html").is_file() and (site / "api" / "index.html").is_file()
    pages = list(site.rglob("*.html"))
    assert len(pages) > 30
    for page in pages:  # opens offline: no asset fetched from the network
        html = page.read_text(encoding="utf-8", errors="replace")
        for tag in ('<script src="http', '<link href="http', "<link rel=\"stylesheet\" href=\"http"):
            assert tag not in html, f"{page.relative_to(site)} loads {tag}"


def _command_lines(text: str) -> list[str]:
    """The ``mechscope ...`` command lines of a page, without ``mechscope``: in fenced blocks other than python and
    json, in indented code blocks (a line's continuation joined to it) and in inline code spans."""
    start = re.compile(r"^\s*(?:\$ )?(?:mechscope|python -m mechscope)\s+(\S.*)$")
    out, cur, fence = [], None, None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("```"):
            fence = None if fence else (s[3:] or "text")
            cur = None
            continue
        code = fence not in (None, "python", "json") or (fence is None and line.startswith("    "))
        m = start.match(line) if code and not s.startswith("#") else None
        if m:
            cur = m.group(1).rstrip("\\")
            out.append(cur)
        elif code and cur is not None and line.startswith(" ") and s[:1] in ("[", "-", "("):
            out[-1] = cur = cur + " " + s.rstrip("\\")
        else:
            cur = None
            if fence is None:
                out += re.findall(r"`(?:mechscope|python -m mechscope) ([^`]+)`", line)
    return out


def test_every_documented_option_exists():
    """Every ``--option`` a page or the README writes after ``mechscope GROUP COMMAND`` is one that command takes
    (a renamed or removed option otherwise lingers in the docs). Lines naming several commands at once
    (``cnn sae|lm sae ...``) are skipped."""
    import typer

    from mechscope.cli import app

    root = typer.main.get_command(app)
    checked, wrong = 0, []
    for page in [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]:
        for line in _command_lines(page.read_text(encoding="utf-8")):
            line = line.split("#")[0]
            cmd, names = root, {o for p in root.params for o in p.opts + p.secondary_opts}
            for word in line.split():
                if not hasattr(cmd, "commands") or word.startswith(("-", "[", "(")):
                    break
                cmd = cmd.commands.get(word)
                if cmd is None:  # a placeholder (COMMAND, a|b, ...)
                    break
                names |= {o for p in cmd.params for o in p.opts + p.secondary_opts}
            if cmd is None or hasattr(cmd, "commands"):
                continue
            checked += 1
            options = re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", line)
            wrong += [f"{page.relative_to(REPO)}: {o} in `mechscope {line.strip()}`" for o in options
                      if o not in names | {"--help"}]  # fmt: skip
    assert checked > 80, f"only {checked} command lines found: the page parser is broken"
    assert not wrong, "\n".join(wrong)
