"""The built documentation site: every page there, every local link resolving, and figures that
render in a real browser.

The site is built by ``bash scripts/build_docs.sh`` (CI runs it in ``.ci/run`` before pytest:
a build takes minutes because it executes every tutorial, too long for a test). These tests read
``docs/_build/html`` (or the folder in ``GENAILAB_DOCS_HTML``) and skip, saying how to build it,
when the site is not there. The browser checks need Chromium (``apt-get install -y chromium``)
and skip, naming that command, without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("GENAILAB_DOCS_HTML", ROOT / "docs" / "_build" / "html"))
DOCS = ROOT / "docs"
TUTORIAL = "tutorials/first_model_pbmc.html"
THEORY = "theory/elbo.html"
API_PACKAGES = ("genailab", "genailab.model", "genailab.likelihood", "genailab.data", "genailab.train",
                "genailab.anndata_models", "genailab.apps", "genailab.perturb", "genailab.eval", "genailab.report")

pytestmark = pytest.mark.skipif(
    not (SITE / "index.html").exists(),
    reason=f"the docs site is not built ({SITE / 'index.html'} missing): run `bash scripts/build_docs.sh --install`",
)


def _sources() -> list[str]:
    """Pages the site must have: every .md under docs/ (tutorials, theory, guides...) as .html."""
    pages = []
    for path in DOCS.rglob("*.md"):
        relative = path.relative_to(DOCS)
        if relative.parts[0].startswith(("_", ".")) or relative.parts[0] == "api":
            continue
        pages.append(relative.with_suffix(".html").as_posix())
    return sorted(pages)


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])
        if tag == "img" and attrs.get("src"):
            self.images.append(attrs["src"])


def _parse(page: Path) -> _Links:
    parser = _Links()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


def test_every_page_is_built():
    missing = [p for p in _sources() + [f"api/{pkg}.html" for pkg in API_PACKAGES] if not (SITE / p).exists()]
    assert not missing, f"pages missing from {SITE}: {missing}; rebuild with scripts/build_docs.sh"


def test_local_links_resolve():
    broken = []
    for page in SITE.rglob("*.html"):
        if "_modules" in page.parts:
            continue
        parsed = _parse(page)
        for href in parsed.links + parsed.images:
            url = urlparse(href)
            if url.scheme or url.netloc or not url.path:
                continue
            target = (page.parent / unquote(url.path)).resolve()
            if not target.exists():
                broken.append(f"{page.relative_to(SITE)} -> {href}")
    assert not broken, "broken local links:\n" + "\n".join(broken[:30])


def test_tutorial_figures_are_real_images():
    """Every figure of the first tutorial is a PNG on disk with more than one colour in it."""
    import matplotlib.image

    images = [src for src in _parse(SITE / TUTORIAL).images if src.endswith(".png")]
    assert len(images) >= 3, f"{TUTORIAL} shows {len(images)} PNG figures; expected training curves, UMAPs, a table plot"
    for src in images:
        pixels = matplotlib.image.imread(SITE / "tutorials" / unquote(src))
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100, src
        assert float(np.std(pixels[..., :3])) > 0.01, f"{src} is blank"


def test_theory_pages_link_into_the_code():
    """Theory pages cross-reference the API: every reference resolved (the build would fail
    otherwise) and landed on an API page."""
    for page in ("theory/elbo.html", "theory/nb_zinb.html", "theory/optimisation.html"):
        links = _parse(SITE / page).links
        into_api = [href for href in links if "api/genailab" in href and "#genailab." in href]
        assert len(into_api) >= 3, f"{page} links to {into_api}"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    pytest.skip("headless Chromium is not installed: `apt-get install -y chromium`")


def _run_chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--allow-file-access-from-files",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", *arguments,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


_PROBE = """<!doctype html><html><body>
<iframe id="page" src="{url}" style="width:1200px;height:20000px"></iframe>
<script>
const frame = document.getElementById("page");
frame.onload = () => {{
  const doc = frame.contentDocument;
  const images = Array.from(doc.images);
  images.forEach(img => img.loading = "eager");
  const report = () => {{
    const out = document.createElement("pre");
    out.id = "probe";
    out.textContent = JSON.stringify({{
      title: doc.title,
      images: images.length,
      loaded: images.filter(img => img.complete && img.naturalWidth > 0).length,
      links: doc.querySelectorAll("a[href]").length,
      text: doc.body.innerText.length,
      math: doc.querySelectorAll("mjx-container").length,
      raw_tex: (doc.body.innerText.match(/\\\\[\\[(]/g) || []).length,
    }});
    document.body.appendChild(out);
  }};
  setTimeout(report, 3000);
}};
</script></body></html>"""


@pytest.mark.parametrize("page", ["index.html", TUTORIAL, THEORY])
def test_page_renders_in_chromium(page: str, tmp_path: Path):
    """Open the page in headless Chromium; every <img> loads (decoded, non-zero width) and, on a
    theory page, MathJax (served by the site itself) typesets every equation."""
    probe = tmp_path / "probe.html"
    probe.write_text(_PROBE.format(url=(SITE / page).resolve().as_uri()))
    done = _run_chromium(tmp_path, "--virtual-time-budget=15000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">(.*?)</pre>', done.stdout, re.S)
    assert found, f"Chromium did not report on {page} (exit {done.returncode}):\n{done.stderr[-2000:]}"
    result = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert "genailab" in result["title"], result
    assert result["text"] > 500 and result["links"] > 10, result
    assert result["loaded"] == result["images"], f"{page}: only {result['loaded']} of {result['images']} images loaded"
    if page == TUTORIAL:
        assert result["images"] >= 3, result  # training curves, UMAPs, the label x cluster table
    if page == THEORY:
        assert result["math"] >= 10 and result["raw_tex"] == 0, f"equations not typeset: {result}"


def test_tutorial_screenshot_is_not_blank(tmp_path: Path):
    """A screenshot of the tutorial as a person opens it: text and figures, not an empty page."""
    import matplotlib.image

    shot = tmp_path / "tutorial.png"
    done = _run_chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", (SITE / TUTORIAL).resolve().as_uri())
    assert shot.exists(), f"no screenshot (exit {done.returncode}):\n{done.stderr[-2000:]}"
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert float(np.std(pixels)) > 0.05
    assert float((pixels.mean(-1) < 0.5).mean()) > 0.01, "the page shows almost no dark pixels (no text or figures)"
