"""MkDocs hooks for the docs site (mkdocs.yml): the repository's own documents as pages, links that work on both.

The site is built from ``docs/`` plus documents that stay where they are: README.md (the home page,
``index.md``) and ARCHITECTURE.md, RELIABILITY.md, BENCHMARKS.md (generated in part by ``python -m bench.docs``,
so they are never copied or edited here). Every document is written for reading in the repository, so its
links are repository paths relative to itself (``../RELIABILITY.md`` from docs/, ``docs/settings.md`` from
README.md); :func:`on_page_markdown` turns each into the site's path of the same file. A repository file a
page links to that is not a page (an image, monitoring/grafana-dashboard.json) is published at its repository
path; a link to a folder keeps its text only; a link to a file that does not exist stays, for MkDocs to refuse.

The API reference's docstrings use Sphinx roles (``:class:`~mtc75.errors.ConfigError```), which Markdown shows
as they are; :func:`on_page_content` turns them into code that links to the object where the reference
documents it (mkdocs-autorefs, optional: no link and no warning where it does not).

Thread contract: MkDocs calls these on its build thread, one page at a time.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent
HOME = "README.md"
# Repository documents published as pages under their own names (besides README.md as index.md).
ROOT_PAGES = ("ARCHITECTURE.md", "RELIABILITY.md", "BENCHMARKS.md")
FENCE = re.compile(r"^(```|~~~)", re.M)
LINK = re.compile(r"(?P<bang>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>[^)\s]+)(?P<title>\s+\"[^\"]*\")?\)")
ROLE = re.compile(r":(?:class|meth|func|mod|attr|exc|data|obj):<code>"
                  r"(?P<tilde>~?)(?P<name>[\w.]+)(?P<call>\(\))?</code>")


def _site_uri(repo_path: str) -> str:
    """The site path of a repository file: docs/X -> X, README.md -> index.md, anything else as it is."""
    if repo_path == HOME:
        return "index.md"
    if repo_path.startswith("docs/"):
        return repo_path.removeprefix("docs/")
    return repo_path


def _repo_path(page_uri: str) -> str:
    """The repository file of a page: index.md -> README.md, the root documents as they are, X -> docs/X."""
    if page_uri == "index.md":
        return HOME
    return page_uri if page_uri in ROOT_PAGES else "docs/" + page_uri


def _prose(text: str) -> list[tuple[bool, str]]:
    """``text`` in pieces, each with whether it is prose (True) or fenced code and fences (False)."""
    pieces: list[tuple[bool, str]] = []
    in_code = False
    for i, part in enumerate(FENCE.split(text)):  # text, fence, text, fence, ...: a fence toggles code
        if i % 2:
            pieces.append((False, part))
            in_code = not in_code
        else:
            pieces.append((not in_code, part))
    return pieces


def _links(text: str) -> list[str]:
    """The link targets of a document, outside fenced code."""
    return [m.group("target") for prose, part in _prose(text) if prose for m in LINK.finditer(part)]


def _resolve(source: str, target: str) -> tuple[str, str] | None:
    """``target`` of a link in repository file ``source`` as (repository path, #anchor); None for a URL or an
    anchor of the page itself."""
    if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path, _, anchor = target.partition("#")
    repo = posixpath.normpath(posixpath.join(posixpath.dirname(source), path))
    return repo, "#" + anchor if anchor else ""


def on_files(files: Files, config: Any) -> Files:
    """Add the repository's documents as pages, and each repository file one of the pages links to."""
    for name, uri in [(HOME, "index.md"), *((name, name) for name in ROOT_PAGES)]:
        files.append(File.generated(config, uri, abs_src_path=str(ROOT / name)))
    sources = [HOME, *ROOT_PAGES] + [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docs").rglob("*.md"))]
    for source in sources:
        for target in _links((ROOT / source).read_text()):
            resolved = _resolve(source, target)
            if resolved is None:
                continue
            repo = resolved[0]
            uri = _site_uri(repo)
            if files.get_file_from_path(uri) is None and (ROOT / repo).is_file() and not repo.startswith(".."):
                files.append(File.generated(config, uri, abs_src_path=str(ROOT / repo)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Repository links -> site links (see the module notes); fenced code is left alone."""
    page_uri = page.file.src_uri
    source = _repo_path(page_uri)

    def fix(m: re.Match[str]) -> str:
        resolved = _resolve(source, m.group("target"))
        if resolved is None:
            return m.group(0)
        repo, anchor = resolved
        uri = _site_uri(repo)
        if (ROOT / repo).is_dir():
            return m.group("text")  # a folder is no page: its text only
        relative = posixpath.relpath(uri, posixpath.dirname(page_uri) or ".")
        return f"{m.group('bang')}[{m.group('text')}]({relative}{anchor}{m.group('title') or ''})"

    return "".join(LINK.sub(fix, part) if prose else part for prose, part in _prose(markdown))


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """``:class:`~a.b.C``` in a docstring -> ``C`` as code, linked to a.b.C where the reference documents it."""

    def fix(m: re.Match[str]) -> str:
        name = m.group("name")
        shown = (name.rsplit(".", 1)[-1] if m.group("tilde") else name) + (m.group("call") or "")
        return f'<autoref identifier="{name}" optional><code>{shown}</code></autoref>'

    return ROLE.sub(fix, html)
