"""`python -m pipeline plots`: DVC's plots as one HTML page that opens offline (static SVG by vl-convert)."""

from __future__ import annotations

import base64
import re

import pytest

from tests.project import sh

pytestmark = pytest.mark.slow


def test_plots_page_has_every_plot_and_references_no_remote_url(fresh_repro, tmp_path):
    page = tmp_path / "index.html"
    sh("python", "-m", "pipeline", "plots", "--out", str(page), cwd=fresh_repro.repo)
    text = page.read_text()
    assert not re.search(r"(https?:)?//[\w.-]+\.\w", text), re.search(r"(https?:)?//[\w.-]+\.\w", text)
    assert "<script" not in text and "@import" not in text
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", text)
    assert sources and all(s.startswith("data:image/svg+xml;base64,") for s in sources), sources
    captions = re.findall(r"<figcaption>(.*?) \(", text)
    assert set(captions) == {"gen PPL vs sampling steps", "gen PPL vs entropy"} | {
        f"metrics/{k}/{log}.tsv" for k in ("mask", "semdlm_plus") for log in ("train_log", "val_log")}
    svgs = {c: base64.b64decode(s.split(",", 1)[1]).decode() for c, s in zip(captions, sources, strict=True)}
    for caption in ("gen PPL vs sampling steps", "gen PPL vs entropy"):  # one series per kernel
        assert svgs[caption].startswith("<svg") and ">mask<" in svgs[caption] and ">semdlm_plus<" in svgs[caption]
