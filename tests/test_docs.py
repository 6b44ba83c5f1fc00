"""The documentation site (docs/, Sphinx): it builds with warnings as errors, offline, and the API reference
names every public name (a docstring that breaks the build fails here, not only in CI's docs step)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPOSITORY
from lit_adamerging.methods import method_names

DOCS = REPOSITORY / "docs"
# the API reference's page of each module whose __all__ it must cover
REFERENCE_PAGES = {
    "lit_adamerging": "api/lit_adamerging.html",
    "lit_adamerging.methods": "api/methods.html",
    "lit_adamerging.merging": "api/merging.html",
    "lit_adamerging.limits": "api/limits.html",
}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site as CI builds it (``python -m sphinx -W -b html docs site``), into a temporary folder."""
    out = tmp_path_factory.mktemp("site")
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(out)],
        capture_output=True, text=True, cwd=REPOSITORY,
    )
    assert build.returncode == 0, f"the docs build failed or warned:\n{build.stdout}\n{build.stderr}"
    return out


def anchors(page: Path) -> set[str]:
    return set(re.findall(r'\sid="([^"]+)"', page.read_text(encoding="utf-8")))


@pytest.mark.slow  # builds the site in another process, importing the library (about 10 s)
def test_docs_build_strictly_with_every_page(site):
    pages = {"index.html", *(f"{page.stem}.html" for page in DOCS.glob("*.md") if page.stem != "index")}
    assert pages <= {path.name for path in site.glob("*.html")}
    assert "id=\"speed\"" in (site / "index.html").read_text(encoding="utf-8")  # the README is the home page
    assert 'href="index.html#speed"' in (site / "performance.html").read_text(encoding="utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(REFERENCE_PAGES))
def test_reference_documents_every_public_name(site, module):
    exported = importlib.import_module(module).__all__
    documented = anchors(site / REFERENCE_PAGES[module])
    assert len(exported) >= 5
    assert [name for name in exported if f"{module}.{name}" not in documented] == []


@pytest.mark.slow
def test_cli_page_has_the_commands_help(site):
    text = (site / "api" / "cli.html").read_text(encoding="utf-8")
    assert text.count("usage: lit-adamerging") >= 2  # --help and fit --help, printed at build time
    assert [name for name in method_names() if name not in text] == []
    assert "paper/vit_b32" in text  # lit-adamerging configs
    assert {"lit_adamerging.cli.main", "lit_adamerging.cli.AdaMergingCLI"} <= anchors(site / "api" / "cli.html")


@pytest.mark.slow
def test_site_loads_nothing_from_the_network(site):
    remote = re.compile(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="(?:https?:)?//', re.IGNORECASE)
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 10
    assert [str(page.relative_to(site)) for page in pages if remote.search(page.read_text(encoding="utf-8"))] == []
