"""The docs site (issue 28 item 7): ``mkdocs build --strict`` passes, every page is there, and the repository's
links become the site's (mkdocs_hooks.py).

No broker. The build runs MkDocs as a user would, into a temporary folder; the hook's link rewriting is also
checked on its own, on documents made up here, including a link that must stay broken for MkDocs to refuse.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mkdocs.config import load_config
from mkdocs.structure.files import Files

import mkdocs_hooks

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


def _build(site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = _build(out)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "WARNING" not in result.stderr, result.stderr[-5000:]
    return out


def _text(page: Path) -> str:
    """A page's visible text (tags dropped)."""
    return re.sub(r"<[^>]+>", "", page.read_text())


@pytest.mark.slow
def test_the_site_builds_strict_with_every_page_and_the_documents_where_they_are(site: Path) -> None:
    config = load_config(str(ROOT / "mkdocs.yml"))
    pages: list[str] = []

    def walk(items: list[object]) -> None:
        for item in items:
            value = next(iter(item.values())) if isinstance(item, dict) else item
            walk(value) if isinstance(value, list) else pages.append(str(value))

    walk(config["nav"])
    for page in pages:
        built = site / ("index.html" if page == "index.md" else page.removesuffix(".md") + "/index.html")
        assert built.is_file(), f"{page} is in the nav but was not built"
    # the generated documents are included as they are, from where they are
    for name in ("RELIABILITY", "BENCHMARKS", "ARCHITECTURE"):
        heading = (ROOT / f"{name}.md").read_text().splitlines()[0].lstrip("# ")
        assert heading in _text(site / name / "index.html")
    assert (site / "bench" / "throughput.png").is_file()  # an image BENCHMARKS.md shows, published beside it


@pytest.mark.slow
def test_the_api_reference_documents_the_public_api_with_its_roles_turned_into_code(site: Path) -> None:
    html = (site / "api" / "index.html").read_text()
    for name in ("mtc75.Consumer", "mtc75.Stats", "mtc75.Health", "mtc75.Failure", "mtc75.testing",
                 "mtc75.errors.ConfigError", "mtc75.errors.MessageFailed", "mtc75.errors.BatchError"):
        assert f'id="{name}"' in html, name
    for method in ("run", "start", "close", "stop", "stats", "health", "retune", "from_settings"):
        assert f'id="mtc75.Consumer.{method}"' in html, method
    assert not re.search(r":(class|meth|mod|func|attr):", _text(site / "api" / "index.html"))


def test_repository_links_become_site_links_and_a_missing_page_stays_a_link_mkdocs_refuses() -> None:
    config, files = None, Files([])
    page = SimpleNamespace(file=SimpleNamespace(src_uri="library.md"))  # docs/library.md in the repository
    markdown = "\n".join([
        "[reliability](../RELIABILITY.md#rate-limits) [home](../README.md#exit-codes) [settings](settings.md)",
        "![plot](../bench/throughput.png) [bench](../bench/) [web](https://kafka.apache.org) [here](#top)",
        "[gone](no-such-page.md)",
        "```python",
        "x = [a](../README.md)  # code: left alone",
        "```",
    ])
    out = mkdocs_hooks.on_page_markdown(markdown, page, config, files)
    assert out.splitlines() == [
        "[reliability](RELIABILITY.md#rate-limits) [home](index.md#exit-codes) [settings](settings.md)",
        "![plot](bench/throughput.png) bench [web](https://kafka.apache.org) [here](#top)",
        "[gone](no-such-page.md)",  # MkDocs warns: the strict build fails
        "```python",
        "x = [a](../README.md)  # code: left alone",
        "```",
    ]
    home = SimpleNamespace(file=SimpleNamespace(src_uri="index.md"))  # README.md in the repository
    out = mkdocs_hooks.on_page_markdown("[s](docs/settings.md#x) [r](RELIABILITY.md)", home, config, files)
    assert out == "[s](settings.md#x) [r](RELIABILITY.md)"


def test_sphinx_roles_in_docstrings_become_code_linked_where_documented() -> None:
    html = ("<p>raise :class:<code>~mtc75.errors.ConfigError</code> or call :meth:<code>mtc75.Consumer.stop()</code>"
            " (:mod:<code>mtc75.testing</code>)</p>")
    out = mkdocs_hooks.on_page_content(html, None, None, Files([]))
    assert out == ('<p>raise <autoref identifier="mtc75.errors.ConfigError" optional><code>ConfigError</code>'
                   '</autoref> or call <autoref identifier="mtc75.Consumer.stop" optional><code>mtc75.Consumer.stop()'
                   '</code></autoref> (<autoref identifier="mtc75.testing" optional><code>mtc75.testing</code>'
                   "</autoref>)</p>")


def test_the_readme_is_what_a_newcomer_needs_first_and_links_every_page() -> None:
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150, "the README is the newcomer's page: the rest belongs in docs/"
    headings = re.findall(r"^## (.+)$", text, re.M)
    assert headings[:6] == ["Two commands", "How it works", "Install", "The three-terminal flow",
                            "The library in 20 lines", "Documentation"]
    library = text.split("## The library in 20 lines", 1)[1]
    block = library.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.splitlines()) <= 20
    linked = set(re.findall(r"\]\(docs/([a-z-]+\.md)", text))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, f"pages the README does not link: {sorted(pages - linked)}"
