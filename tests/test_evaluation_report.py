"""spo.evaluation.report: the self-contained HTML report, the Markdown summary, plots, DVC data, the PNG grid."""

from __future__ import annotations

import base64
import csv
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from spo.evaluation.report import GridRow, format_estimate, image_grid, write_report
from spo.evaluation.statistics import summarise

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS = ["base", "spo", "dpo"]
METRICS = ["aesthetic", "spm_t0"]
EVIL = "<script>alert('x')</script> & \"quoted\""
COLORS = {"base": (255, 0, 0), "spo": (0, 160, 0), "dpo": (0, 0, 255)}


def score_table(num_prompts: int = 6, seeds=(0, 1)) -> pd.DataFrame:
    """spo = base + 1 (wins every pair), dpo = base (ties every pair)."""
    rng = np.random.default_rng(0)
    keys = [(p, s) for p in range(num_prompts) for s in seeds]
    base = {m: rng.normal(size=len(keys)) for m in METRICS}
    rows = []
    for model, shift in (("base", 0.0), ("spo", 1.0), ("dpo", 0.0)):
        for i, (p, s) in enumerate(keys):
            prompt = EVIL if p == 1 else f"a digit {p} on paper"
            rows.append({"model": model, "prompt_index": p, "prompt": prompt, "seed": s,
                         **{m: base[m][i] + shift for m in METRICS}})
    return pd.DataFrame(rows)


def grid_rows() -> list[GridRow]:
    def solid(model, size=32):
        return Image.new("RGB", (size, size), COLORS[model])
    return [GridRow("a digit 0 on paper", 0, {m: solid(m) for m in MODELS}, prompt_index=0),
            GridRow(EVIL, 1, {m: solid(m) for m in MODELS}, prompt_index=1)]


class Page(HTMLParser):
    """Elements of interest: cells of each table (by id), every attribute, all tags."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[dict]] = {}
        self._table: list[str] = []
        self._cell: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table.append(attrs.get("id", ""))
            self.tables.setdefault(self._table[-1], [])
        elif tag in ("th", "td") and self._table:
            self._cell = {"tag": tag, **attrs, "text": "", "imgs": []}
            self.tables[self._table[-1]].append(self._cell)
        elif tag == "img" and self._cell is not None:
            self._cell["imgs"].append(attrs)

    def handle_endtag(self, tag):
        if tag == "table":
            self._table.pop()
        elif tag in ("th", "td"):
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    (out / "metrics.json").write_text("{}")  # the caller's file: must survive
    table = score_table()
    summary = summarise(table, metrics=METRICS, models=MODELS, n_resamples=200)
    files = write_report(out, title="digits <eval>", summary=summary, table=table, metrics=METRICS,
                         models=MODELS, grid_rows=grid_rows(),
                         protocol={"prompts": 6, "seeds": [0, 1], "steps": 20, "CFG": 5.0, "scorer": EVIL},
                         notes=["spm_t0 is the reward SPO optimised — not an independent judge"])
    html = files.html.read_text()
    page = Page()
    page.feed(html)
    return {"out": out, "files": files, "summary": summary, "table": table, "html": html, "page": page,
            "md": files.markdown.read_text()}


def test_files_are_written_beside_the_callers(report):
    out, files = report["out"], report["files"]
    assert (out / "metrics.json").read_text() == "{}"
    assert files.html == out / "report.html" and files.markdown == out / "summary.md"
    assert files.plots == [out / "plots" / f"{m}.png" for m in METRICS]
    assert files.distributions == [out / "distributions" / f"{m}.csv" for m in METRICS]
    for path in files.plots:
        assert Image.open(path).format == "PNG"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_metrics_table_has_every_model_column_and_the_values(report):
    cells, summary = report["page"].tables["metrics-table"], report["summary"]
    assert [c["data-model"] for c in cells if c["tag"] == "th" and "data-model" in c] == MODELS
    assert all(f"model-{c['data-model']}" in c["class"].split() for c in cells if "data-model" in c)
    for model in MODELS:
        texts = [c["text"] for c in cells if c["tag"] == "td" and c.get("data-model") == model]
        expected = [format_estimate(summary["models"][model][m], summary["models"][model][f"{m}_ci_low"],
                                    summary["models"][model][f"{m}_ci_high"]) for m in METRICS]
        assert texts == expected
    assert report["summary"]["models"]["spo"]["aesthetic"] == pytest.approx(
        report["table"].query("model == 'spo'")["aesthetic"].mean())


def test_win_rates_highlight_intervals_that_exclude_half(report):
    table = report["page"].tables["win-rate-table"]
    pairs = ["spo_vs_base", "dpo_vs_base", "dpo_vs_spo"]
    assert [c["data-pair"] for c in table if c["tag"] == "th" and "data-pair" in c] == pairs
    cells = [c for c in table if c["tag"] == "td"]  # row by row: one row per metric, one cell per pair
    assert [c["data-pair"] for c in cells] == pairs * len(METRICS)
    by_pair = {(c["data-pair"], i // len(pairs)): c for i, c in enumerate(cells)}
    for j in range(len(METRICS)):
        assert by_pair["spo_vs_base", j]["text"] == "1.000 [1.000, 1.000]"
        assert by_pair["spo_vs_base", j]["class"] == "above"
        assert by_pair["dpo_vs_base", j]["text"] == "0.500 [0.500, 0.500]"
        assert "class" not in by_pair["dpo_vs_base", j]  # ties: the interval is 0.5 itself, it does not exclude it
        assert by_pair["dpo_vs_spo", j]["class"] == "below"


def test_grid_has_every_model_column_and_embedded_images(report):
    cells = report["page"].tables["image-grid"]
    assert [c["data-model"] for c in cells if c["tag"] == "th" and "data-model" in c] == MODELS
    images = [(c["data-model"], c["imgs"]) for c in cells if c["tag"] == "td"]
    assert [m for m, _ in images] == MODELS * 2
    for model, imgs in images:
        (img,) = imgs
        assert img["src"].startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).convert("RGB")
        assert decoded.getpixel((5, 5)) == COLORS[model]
        assert img["width"] == img["height"] == "160" and "pixelated" in img["class"]
    captions = [c["text"] for c in cells if c["tag"] == "th" and c.get("class") == "caption" and c.get("scope")]
    assert captions == ["a digit 0 on paperseed 0", f"{EVIL}seed 1"]
    spo_scores = [c["text"] for c in cells if c["tag"] == "td" and c["data-model"] == "spo"][0]
    value = report["table"].query("model == 'spo' and prompt_index == 0 and seed == 0")["aesthetic"].item()
    assert f"aesthetic {value:.3f}" in spo_scores


def test_html_is_self_contained_and_escapes_user_text(report):
    html, page = report["html"], report["page"]
    for tag, attrs in page.tags:
        for key in ("src", "href"):
            assert not attrs.get(key, "").lower().startswith(("http", "//")), (tag, attrs.get(key)[:60])
    assert "http" not in html.replace("data:image", "")
    assert not [t for t, _ in page.tags if t in ("script", "link", "iframe")]
    assert "<script>alert" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &quot;quoted&quot;" in html
    assert "<title>digits &lt;eval&gt;</title>" in html
    figures = [a for t, a in page.tags if t == "img" and "distribution" in a.get("alt", "")]
    assert len(figures) == len(METRICS) and all(a["src"].startswith("data:image/png;base64,") for a in figures)
    assert "not an independent judge" in html
    protocol = {c["text"] for c in page.tables["protocol-table"]}
    assert {"prompts", "6", "seeds", "0, 1", "CFG", "5"} <= protocol


def test_markdown_has_protocol_and_tables_without_images(report):
    md, summary = report["md"], report["summary"]
    assert "| metric | base | spo | dpo |" in md
    row = next(line for line in md.splitlines() if line.startswith("| aesthetic |"))
    assert row == "| aesthetic | " + " | ".join(
        format_estimate(summary["models"][m]["aesthetic"], summary["models"][m]["aesthetic_ci_low"],
                        summary["models"][m]["aesthetic_ci_high"]) for m in MODELS) + " |"
    assert "| metric | spo vs base | dpo vs base | dpo vs spo |" in md
    assert "| spm_t0 | **1.000 [1.000, 1.000]** | 0.500 [0.500, 0.500] | **0.000 [0.000, 0.000]** |" in md
    assert "| seeds | 0, 1 |" in md and "| scorer | <script>alert('x')</script> & \"quoted\" |" in md
    assert "data:image" not in md and "<img" not in md and "![" not in md


def test_distribution_csvs_are_sorted_scores_per_model(report):
    table = report["table"]
    for metric, path in zip(METRICS, report["files"].distributions):
        with path.open() as f:
            rows = list(csv.DictReader(f))
        assert list(rows[0]) == ["model", "quantile", "score"]
        assert [r["model"] for r in rows] == [m for m in MODELS for _ in range(12)]
        for model in MODELS:
            mine = [r for r in rows if r["model"] == model]
            assert [float(r["quantile"]) for r in mine] == np.linspace(0, 1, 12).tolist()
            expected = np.sort(table.loc[table.model == model, metric].to_numpy())
            assert [float(r["score"]) for r in mine] == expected.tolist()


def test_format_estimate_known_values():
    assert format_estimate(1.5, 1.25, 1.75) == "1.50 [1.25, 1.75]"
    assert format_estimate(21.5321, 21.5012, 21.5634) == "21.532 [21.501, 21.563]"  # decimals follow the width
    assert format_estimate(0.625, 0.56, 0.69, rate=True) == "0.625 [0.560, 0.690]"
    assert format_estimate(0.5, 0.5, 0.5, rate=True) == "0.500 [0.500, 0.500]"
    assert format_estimate(float("nan"), None, None) == "—"


def test_handmade_summary_lands_in_the_right_cells(tmp_path):
    """A summary written by hand (as read back from metrics.json): each value in its model's / pair's cell."""
    table = score_table()
    summary = {"models": {"base": {"aesthetic": 1.5, "aesthetic_ci_low": 1.25, "aesthetic_ci_high": 1.75},
                          "spo": {"aesthetic": 2.5, "aesthetic_ci_low": 2.25, "aesthetic_ci_high": 2.75}},
               "win_rate": {"spo_vs_base": {"aesthetic": 0.625, "aesthetic_ci_low": 0.56, "aesthetic_ci_high": 0.69}},
               "delta": {"spo_vs_base": {"aesthetic": -0.5, "aesthetic_ci_low": -0.75, "aesthetic_ci_high": -0.25}},
               "num_samples": 12, "num_prompts": 6}
    files = write_report(tmp_path, title="t", summary=summary, table=table, metrics=["aesthetic"],
                         models=["base", "spo"], grid_rows=[], protocol={"steps": 4})
    page = Page()
    page.feed(files.html.read_text())
    cells = {(t, c.get("data-model") or c.get("data-pair")): c for t in ("metrics-table", "win-rate-table",
             "delta-table") for c in page.tables[t] if c["tag"] == "td"}
    assert cells["metrics-table", "base"]["text"] == "1.50 [1.25, 1.75]"
    assert cells["metrics-table", "spo"]["text"] == "2.50 [2.25, 2.75]"
    assert cells["win-rate-table", "spo_vs_base"]["text"] == "0.625 [0.560, 0.690]"
    assert cells["win-rate-table", "spo_vs_base"]["class"] == "above"
    assert cells["delta-table", "spo_vs_base"]["text"] == "-0.50 [-0.75, -0.25]"
    assert cells["delta-table", "spo_vs_base"]["class"] == "below"
    assert "image-grid" not in page.tables
    md = files.markdown.read_text()
    assert "| aesthetic | 1.50 [1.25, 1.75] | 2.50 [2.25, 2.75] |" in md
    assert "| aesthetic | **0.625 [0.560, 0.690]** |" in md
    assert "| aesthetic | **-0.50 [-0.75, -0.25]** |" in md
    assert "12 samples per model over 6 prompts" in md


def test_report_rejects_unsafe_metric_names_and_missing_images(tmp_path):
    table = score_table()
    summary = summarise(table, metrics=METRICS, models=MODELS, n_resamples=50)
    kwargs = dict(title="t", summary=summary, table=table, models=MODELS, protocol={})
    with pytest.raises(ValueError, match="'../x' cannot be a file name"):
        write_report(tmp_path, metrics=["../x"], grid_rows=[], **kwargs)
    partial = [GridRow("p", 0, {"base": Image.new("RGB", (8, 8))})]
    with pytest.raises(ValueError, match=r"no image for model\(s\) \['spo', 'dpo'\]"):
        write_report(tmp_path, metrics=METRICS, grid_rows=partial, **kwargs)
    assert not list(tmp_path.iterdir())


def test_image_grid_png_layout():
    rows = grid_rows()
    cell = 64
    grid = image_grid(rows, MODELS, cell=cell)
    gap, caption_w = 4, 200
    assert grid.width == gap + caption_w + gap + len(MODELS) * (cell + gap)
    pixels = np.asarray(grid)
    x0 = gap + caption_w + gap
    header_h = grid.height - len(rows) * (cell + gap)
    for r in range(len(rows)):
        for c, model in enumerate(MODELS):
            x, y = x0 + c * (cell + gap), header_h + r * (cell + gap)
            tile = pixels[y:y + cell, x:x + cell]
            assert (tile == COLORS[model]).all()  # 32 px upscaled to fill the 64 px cell
            assert (pixels[y:y + cell, x + cell + 1] != COLORS[model]).any(axis=-1).all()  # the gap
        assert (pixels[header_h + r * (cell + gap): header_h + r * (cell + gap) + 20, gap:caption_w] < 128).any()
    for c in range(len(MODELS)):  # model names written above each column
        x = x0 + c * (cell + gap)
        assert (pixels[:header_h - 1, x:x + cell] < 128).any()


def test_image_grid_nearest_upscaling_keeps_pixels_sharp():
    checker = Image.fromarray((np.indices((8, 8)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    grid = image_grid([GridRow("p", 0, {"base": checker})], ["base"], cell=64)
    tile = np.asarray(grid)[-(64 + 4):-4, 4 + 200 + 4:4 + 200 + 4 + 64, 0]
    assert set(np.unique(tile).tolist()) == {0, 255}


def test_dvc_template_uses_dvc_anchors():
    template = json.loads((REPO_ROOT / "dvc_plots" / "score_quantiles_by_model.json").read_text())
    text = json.dumps(template)
    assert template["data"]["values"] == "<DVC_METRIC_DATA>"
    assert template["encoding"]["x"]["field"] == "<DVC_METRIC_X>"
    assert template["encoding"]["y"]["field"] == "<DVC_METRIC_Y>"
    assert template["encoding"]["color"]["field"] == "model"
    assert "http" not in text.replace(template["$schema"], "")


def test_dvc_renders_the_distributions_with_the_template(report, tmp_path):
    """The template through dvc-render (what `dvc plots show` calls): one line per model, data filled in."""
    from dvc_render import VegaRenderer

    path = report["files"].distributions[0]
    with path.open() as f:
        datapoints = list(csv.DictReader(f))
    renderer = VegaRenderer(datapoints, str(path), template=str(REPO_ROOT / "dvc_plots" /
                                                                  "score_quantiles_by_model.json"),
                            x="quantile", y="score")
    spec = renderer.get_filled_template()
    assert "<DVC_METRIC" not in json.dumps(spec)
    assert len(spec["data"]["values"]) == 12 * len(MODELS)
    assert {d["model"] for d in spec["data"]["values"]} == set(MODELS)
    assert spec["encoding"]["x"]["field"] == "quantile" and spec["encoding"]["y"]["field"] == "score"
