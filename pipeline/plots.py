"""plots: DVC's plots (dvc.yaml) as one self-contained HTML page, static SVG rendered by vl-convert (no network).

`dvc plots show` writes an HTML page that loads Vega from a CDN; this one embeds each plot as an SVG image
(rendered here from the Vega-Lite spec that DVC fills in), so it opens offline. With revisions it compares them
like `dvc plots diff` (one line style per revision).
"""

from __future__ import annotations

import base64
import html
import json
import subprocess
from pathlib import Path

from pipeline.common import StageError, atomic


def specs(revs: list[str]) -> dict[str, list[dict]]:
    """{plot id: [rendered plot]} from `dvc plots show --json` (workspace) or `dvc plots diff <revs> --json`."""
    cmd = ["dvc", "plots", "diff", *revs, "--json"] if revs else ["dvc", "plots", "show", "--json"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise StageError(f"`{' '.join(cmd)}` failed: {last}; run it in the repository after `dvc repro`")
    data = json.loads(res.stdout).get("data", {})
    if not data:
        raise StageError("DVC found no plot data; run `dvc repro` first")
    return data


def svg(spec: dict) -> str:
    import vl_convert

    return vl_convert.vegalite_to_svg(spec)


def page(plots: dict[str, list[dict]], title: str) -> str:
    """An HTML page with every vega plot as an inline data-URI SVG image (nothing fetched when it opens)."""
    body = []
    for plot_id, items in plots.items():
        for item in items:
            if item.get("type") != "vega":
                raise StageError(f"plot {plot_id!r} is of type {item.get('type')!r}; only vega plots are rendered")
            data = base64.b64encode(svg(item["content"]).encode()).decode()
            revs = ", ".join(item.get("revisions", []))
            body.append(f'<figure><img alt="{html.escape(plot_id)}" src="data:image/svg+xml;base64,{data}">'
                        f"<figcaption>{html.escape(plot_id)} ({html.escape(revs)})</figcaption></figure>")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            "<style>body{font-family:sans-serif}figure{display:inline-block;margin:12px}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>\n" + "\n".join(body) + "\n</body></html>\n")


def run(out: Path, revs: list[str]) -> None:
    title = "semdlm plots: " + (" vs ".join(revs) if revs else "workspace")
    text = page(specs(revs), title)
    with atomic(out) as tmp:
        tmp.write_text(text)
    print(f"wrote {out} ({text.count('<figure>')} plots, self-contained)")
