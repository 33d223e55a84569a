"""Evaluation report: a self-contained HTML page, a Markdown summary, distribution plots and DVC plot data.

`write_report(out_dir, ...)` writes, each file atomically and leaving other files in `out_dir` alone:

    report.html                 title, protocol, metrics table, win-rate table, mean-difference table,
                                notes, one distribution plot per metric, the image grid as an HTML table;
                                no external URL: CSS inline, images as data: URIs, no JavaScript
    summary.md                  protocol and the same tables in GitHub Markdown (no images; KFP's Markdown artifact)
    plots/<metric>.png          histogram per model (overlaid) beside a box plot per model with mean and interval
    distributions/<metric>.csv  long format model,quantile,score for DVC plots
                                (template: dvc_plots/score_quantiles_by_model.json, x: quantile, y: score)

Every model column carries `data-model="<name>"` and the class `model model-<slug>` in the metrics, win-rate
and grid tables; tables have ids metrics-table, win-rate-table, delta-table, image-grid, protocol-table.
All user text (prompts, model names, protocol values, notes) is HTML-escaped.

`image_grid` draws the same grid as one PNG (for MLflow): a caption column (prompt wrapped, seed), one
column per model under a header with its name, images fitted to `cell` px (NEAREST when upscaling).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from spo.atomic_write import atomic_file

MAX_QUANTILES = 1001  # distribution CSVs: every sorted score up to this many samples, else this many quantiles
EMBED_MAX_SIDE = 384  # HTML grid: larger images are downscaled (and JPEG-encoded) before embedding
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class GridRow:
    prompt: str
    seed: int
    images: dict[str, Image.Image]  # model -> image
    prompt_index: int | None = None  # where given, the HTML grid shows this sample's scores from the table


@dataclass(frozen=True)
class ReportFiles:
    html: Path
    markdown: Path
    plots: list[Path]
    distributions: list[Path]


# --- PNG grid -----------------------------------------------------------------------------------------

def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return font.getlength(text)


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """Greedy word wrap to `width` px; words longer than a line are split; the last kept line ends in
    an ellipsis when text is cut."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        current = ""
        while _text_width(font, word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(font, last + "…") > width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines or [""]


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """`image` as RGB, scaled to fit a cell x cell box (NEAREST when enlarging, LANCZOS when shrinking)."""
    image = image.convert("RGB")
    scale = cell / max(image.size)
    if scale == 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.NEAREST if scale > 1 else Image.LANCZOS)


def _check_rows(rows: Sequence[GridRow], models: Sequence[str]) -> None:
    if not models:
        raise ValueError("no models given for the image grid")
    for row in rows:
        missing = [m for m in models if m not in row.images]
        if missing:
            raise ValueError(f"grid row (prompt {row.prompt!r}, seed {row.seed}) has no image for model(s) {missing}")


def image_grid(rows: Sequence[GridRow], models: Sequence[str], *, cell: int = 160) -> Image.Image:
    """One row per (prompt, seed) with its wrapped caption on the left, one column per model (its name
    as header); cells `cell` px, separated by a gap, each image framed by a thin grey border."""
    _check_rows(rows, models)
    gap = max(4, cell // 32)
    size = max(12, cell // 11)
    font, small = _font(size), _font(max(10, size - 2))
    line = round(size * 1.3)
    caption_w = max(200, cell + cell // 2)
    header_lines = [_wrap(m, font, cell, 2) for m in models]
    header_h = gap + line * max(len(lines) for lines in header_lines) + gap
    width = gap + caption_w + gap + len(models) * (cell + gap)
    height = header_h + len(rows) * (cell + gap) + (gap if not rows else 0)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    x0 = gap + caption_w + gap
    for c, lines in enumerate(header_lines):
        for i, text in enumerate(lines):
            x = x0 + c * (cell + gap) + (cell - _text_width(font, text)) / 2
            draw.text((x, gap + i * line), text, fill="black", font=font)
    max_lines = max(1, (cell - line) // line)
    for r, row in enumerate(rows):
        y = header_h + r * (cell + gap)
        texts = _wrap(str(row.prompt), font, caption_w, max_lines)
        for i, text in enumerate(texts):
            draw.text((gap, y + i * line), text, fill="black", font=font)
        draw.text((gap, y + len(texts) * line), f"seed {row.seed}", fill=(90, 90, 90), font=small)
        for c, model in enumerate(models):
            x = x0 + c * (cell + gap)
            draw.rectangle((x - 1, y - 1, x + cell, y + cell), outline=(200, 200, 200))
            tile = _fit(row.images[model], cell)
            grid.paste(tile, (x + (cell - tile.width) // 2, y + (cell - tile.height) // 2))
    return grid


# --- formatting ---------------------------------------------------------------------------------------

def _decimals(low: float, high: float, *, lo: int = 2, hi: int = 6) -> int:
    """Decimals that resolve an interval of this width: two significant digits of the width."""
    width = high - low
    if not (math.isfinite(width) and width > 0):
        return 3
    return int(min(hi, max(lo, 1 - math.floor(math.log10(width)))))


def format_estimate(value: float, low: float | None, high: float | None, *, rate: bool = False) -> str:
    """"mean [low, high]" with decimals matched to the interval's width ("0.625 [0.560, 0.690]" for rates)."""
    if value is None or not math.isfinite(value):
        return "—"
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return f"{value:.3f}" if rate else f"{value:.4g}"
    d = 3 if rate else _decimals(low, high)
    return f"{value:.{d}f} [{low:.{d}f}, {high:.{d}f}]"


def _estimate(entry: Mapping | None, metric: str) -> tuple[float | None, float | None, float | None]:
    if not entry or metric not in entry:
        return None, None, None
    return entry[metric], entry.get(f"{metric}_ci_low"), entry.get(f"{metric}_ci_high")


def _excludes(low: float | None, high: float | None, null: float) -> str:
    """"above" / "below" where the interval lies wholly above / below `null`, else ""."""
    if low is None or high is None:
        return ""
    if low > null:
        return "above"
    if high < null:
        return "below"
    return ""


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", name)


def _pairs(summary: Mapping, models: Sequence[str]) -> list[tuple[str, str]]:
    """(key, label) of each win-rate pair in summary order; "a_vs_b" shown as "a vs b"."""
    names = {f"{a}_vs_{b}": f"{a} vs {b}" for a in models for b in models if a != b}
    return [(key, names.get(key, key)) for key in summary.get("win_rate", {})]


def _protocol_value(value: object) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {_protocol_value(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return ", ".join(_protocol_value(v) for v in value)
    return str(value)


def _interval_note(summary: Mapping) -> str:
    conf = summary.get("confidence")
    level = f"{100 * conf:g}% " if isinstance(conf, (int, float)) else ""
    resamples = summary.get("n_resamples")
    times = f", {resamples} resamples" if isinstance(resamples, int) else ""
    counts = []
    if "num_samples" in summary:
        counts.append(f"{summary['num_samples']} samples per model")
    if "num_prompts" in summary:
        counts.append(f"{summary['num_prompts']} prompts")
    head = f"{' over '.join(counts)}. " if counts else ""
    return (f"{head}Intervals: {level}percentile bootstrap resampling whole prompts{times}; "
            "comparisons are paired by (prompt, seed), ties count as half a win.")


# --- plots and distributions ----------------------------------------------------------------------------

def _colors(models: Sequence[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(models)}


def distribution_plot(scores: Mapping[str, np.ndarray], metric: str, summary: Mapping | None = None) -> bytes:
    """PNG: overlaid histograms per model (shared bins) beside a box plot per model with the mean and its
    interval (from `summary`, where given) marked."""
    from matplotlib.figure import Figure

    models = list(scores)
    colors = _colors(models)
    fig = Figure(figsize=(9, 0.9 + 0.5 * max(3, len(models))), dpi=100, layout="constrained")
    hist_ax, box_ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    everything = np.concatenate([np.asarray(v, dtype=float) for v in scores.values()])
    n = max(len(v) for v in scores.values())
    bins = np.histogram_bin_edges(everything, bins=int(np.clip(np.sqrt(n), 10, 40)))
    for m in models:
        hist_ax.hist(scores[m], bins=bins, histtype="step", linewidth=1.6, color=colors[m], label=m)
        hist_ax.hist(scores[m], bins=bins, histtype="stepfilled", alpha=0.12, color=colors[m])
    hist_ax.set_xlabel(metric)
    hist_ax.set_ylabel("samples")
    hist_ax.legend(frameon=False, fontsize="small")
    positions = np.arange(len(models))[::-1]
    box_kw = {"positions": positions, "widths": 0.5, "patch_artist": True,
              "flierprops": {"markersize": 3, "alpha": 0.5}}
    try:
        parts = box_ax.boxplot([scores[m] for m in models], orientation="horizontal", **box_kw)
    except TypeError:  # matplotlib < 3.10
        parts = box_ax.boxplot([scores[m] for m in models], vert=False, **box_kw)
    for patch, m in zip(parts["boxes"], models):
        patch.set_facecolor(colors[m])
        patch.set_alpha(0.35)
    for pos, m in zip(positions, models):
        value, low, high = _estimate((summary or {}).get("models", {}).get(m), metric)
        if value is None:
            value = float(np.mean(scores[m]))
        if low is not None and high is not None:
            box_ax.errorbar([value], [pos], xerr=[[value - low], [high - value]], fmt="D", color="black",
                            markersize=4, capsize=3, linewidth=1.2)
        else:
            box_ax.plot([value], [pos], "D", color="black", markersize=4)
    box_ax.set_yticks(positions, models)
    box_ax.set_xlabel(f"{metric} (◆ mean, bar: interval)")
    for ax in (hist_ax, box_ax):
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="x", alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def quantile_rows(scores: Mapping[str, np.ndarray]) -> list[tuple[str, float, float]]:
    """(model, quantile, score) rows: each model's sorted scores at quantiles i/(n-1) (every sample up to
    MAX_QUANTILES samples, else MAX_QUANTILES evenly spaced empirical quantiles)."""
    out = []
    for model, values in scores.items():
        values = np.sort(np.asarray(values, dtype=float))
        if len(values) > MAX_QUANTILES:
            levels = np.linspace(0.0, 1.0, MAX_QUANTILES)
            values = np.quantile(values, levels)
        else:
            levels = np.linspace(0.0, 1.0, len(values)) if len(values) > 1 else np.zeros(1)
        out += [(model, float(q), float(s)) for q, s in zip(levels, values)]
    return out


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _write_text(path: Path, text: str) -> None:
    _write_bytes(path, text.encode("utf-8"))


def _write_quantiles(path: Path, rows: list[tuple[str, float, float]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "quantile", "score"])
    writer.writerows((m, repr(q), repr(s)) for m, q, s in rows)
    _write_text(path, buf.getvalue())


# --- HTML -----------------------------------------------------------------------------------------------

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1f24;
       margin: 0 auto; max-width: 1200px; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 18px; margin: 28px 0 8px; }
.sub, .caption-note { color: #57606a; font-size: 13px; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
thead th { background: #f6f8fa; }
table.results td { font-variant-numeric: tabular-nums; white-space: nowrap; }
table.kv th { background: #f6f8fa; font-weight: 600; }
td.above { background: #dafbe1; font-weight: 600; } td.below { background: #ffebe9; font-weight: 600; }
.legend span { padding: 1px 6px; border: 1px solid #d0d7de; margin-right: 8px; }
.legend .above { background: #dafbe1; } .legend .below { background: #ffebe9; }
ul.notes li { margin: 3px 0; }
figure { margin: 10px 0 18px; } figure img { max-width: 100%; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 13px; }
table.grid { border-collapse: separate; border-spacing: 8px; margin-left: -8px; }
table.grid th, table.grid td { border: none; padding: 0; }
table.grid thead th { background: none; text-align: center; font-weight: 600; }
table.grid th.caption { width: 240px; font-weight: normal; padding-right: 6px; }
table.grid .seed { color: #57606a; font-size: 12px; }
table.grid img { display: block; border: 1px solid #d0d7de; background: #f6f8fa; }
table.grid img.pixelated { image-rendering: pixelated; }
table.grid .scores { color: #57606a; font-size: 11px; margin-top: 2px; font-variant-numeric: tabular-nums; }
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _model_attrs(model: str) -> str:
    return f'class="model model-{_e(_slug(model))}" data-model="{_e(model)}"'


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _embed_image(image: Image.Image) -> tuple[str, int, int]:
    """(data URI, width, height) of an image for the HTML grid; large ones shrunk and JPEG-encoded."""
    if image.mode not in ("RGB", "RGBA", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    if max(image.size) > EMBED_MAX_SIDE:
        image = image.convert("RGB")
        image.thumbnail((EMBED_MAX_SIDE, EMBED_MAX_SIDE), Image.LANCZOS)
        image.save(buf, format="JPEG", quality=90)
        return _data_uri(buf.getvalue(), "image/jpeg"), image.width, image.height
    image.save(buf, format="PNG")
    return _data_uri(buf.getvalue(), "image/png"), image.width, image.height


def _protocol_html(protocol: Mapping[str, object]) -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_protocol_value(v))}</td></tr>" for k, v in protocol.items())
    return f'<table id="protocol-table" class="kv"><tbody>{rows}</tbody></table>'


def _metrics_html(summary: Mapping, metrics: Sequence[str], models: Sequence[str]) -> str:
    head = "".join(f"<th {_model_attrs(m)}>{_e(m)}</th>" for m in models)
    body = []
    for metric in metrics:
        cells = "".join(
            f"<td {_model_attrs(m)}>{_e(format_estimate(*_estimate(summary['models'].get(m), metric)))}</td>"
            for m in models)
        body.append(f'<tr data-metric="{_e(metric)}"><th>{_e(metric)}</th>{cells}</tr>')
    return (f'<table id="metrics-table" class="results"><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _comparison_html(table_id: str, section: Mapping, pairs: list[tuple[str, str]], metrics: Sequence[str],
                     *, null: float, rate: bool) -> str:
    head = "".join(f'<th class="pair" data-pair="{_e(key)}">{_e(label)}</th>' for key, label in pairs)
    body = []
    for metric in metrics:
        cells = []
        for key, _ in pairs:
            value, low, high = _estimate(section.get(key), metric)
            side = _excludes(low, high, null)
            cls = f' class="{side}"' if side else ""
            cells.append(f'<td data-pair="{_e(key)}"{cls}>{_e(format_estimate(value, low, high, rate=rate))}</td>')
        body.append(f'<tr data-metric="{_e(metric)}"><th>{_e(metric)}</th>{"".join(cells)}</tr>')
    return (f'<table id="{table_id}" class="results"><thead><tr><th>metric</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def _sample_scores(table: pd.DataFrame, metrics: Sequence[str], by: str) -> dict[tuple, dict[str, float]]:
    """(model, table[by], seed) -> scores, for the keys that name exactly one row of the table."""
    if not {"model", by, "seed"} <= set(table.columns):
        return {}
    cast = int if by == "prompt_index" else str
    keys = [(str(m), cast(p), int(s)) for m, p, s in zip(table["model"], table[by], table["seed"])]
    counts: dict[tuple, int] = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    values = table[list(metrics)].to_numpy(dtype=float)
    return {k: dict(zip(metrics, row.tolist())) for k, row in zip(keys, values) if counts[k] == 1}


def _grid_html(rows: Sequence[GridRow], models: Sequence[str], table: pd.DataFrame, metrics: Sequence[str],
               cell: int) -> str:
    """Sample scores under each image: looked up by (model, prompt_index, seed) where the row has a
    prompt_index, else by (model, prompt text, seed) where that names one table row."""
    by_index = _sample_scores(table, metrics, "prompt_index")
    by_text = _sample_scores(table, metrics, "prompt")
    head = "".join(f"<th {_model_attrs(m)}>{_e(m)}</th>" for m in models)
    body = []
    for row in rows:
        cells = [f'<th class="caption" scope="row"><div class="prompt">{_e(row.prompt)}</div>'
                 f'<div class="seed">seed {_e(row.seed)}</div></th>']
        for m in models:
            uri, w, h = _embed_image(row.images[m])
            scale = cell / max(w, h)
            cls = ' class="pixelated"' if scale > 1 else ""
            alt = f"{m}: {row.prompt} (seed {row.seed})"
            if row.prompt_index is not None:
                own = by_index.get((str(m), int(row.prompt_index), int(row.seed)))
            else:
                own = by_text.get((str(m), str(row.prompt), int(row.seed)))
            text = ""
            if own:
                text = '<div class="scores">' + "<br>".join(
                    f"{_e(k)} {v:.3f}" for k, v in own.items()) + "</div>"
            cells.append(f'<td {_model_attrs(m)}><img src="{uri}" width="{round(w * scale)}" '
                         f'height="{round(h * scale)}"{cls} alt="{_e(alt)}">{text}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<table id="image-grid" class="grid"><thead><tr><th class="caption">prompt</th>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")


def render_html(*, title: str, summary: Mapping, metrics: Sequence[str], models: Sequence[str],
                grid_rows: Sequence[GridRow], protocol: Mapping[str, object], notes: Sequence[str],
                plots: Mapping[str, bytes], table: pd.DataFrame, cell: int = 160) -> str:
    pairs = _pairs(summary, models)
    parts = [f"<header><h1>{_e(title)}</h1><p class=\"sub\">{_e(_interval_note(summary))}</p></header>",
             f'<section id="protocol"><h2>Protocol</h2>{_protocol_html(protocol)}</section>',
             '<section id="metrics"><h2>Scores</h2><p class="caption-note">Mean per model [interval].</p>'
             f"{_metrics_html(summary, metrics, models)}</section>"]
    legend = ('<p class="legend caption-note"><span class="above">interval above {0}</span>'
              '<span class="below">interval below {0}</span></p>')
    if pairs:
        parts.append('<section id="win-rates"><h2>Paired win rates</h2><p class="caption-note">Share of '
                     "(prompt, seed) pairs where the first model scores higher [interval].</p>"
                     + _comparison_html("win-rate-table", summary["win_rate"], pairs, metrics, null=0.5, rate=True)
                     + legend.format("0.5") + "</section>")
    if summary.get("delta"):
        parts.append('<section id="deltas"><h2>Mean differences</h2><p class="caption-note">mean(first) − '
                     "mean(second) over paired samples [interval].</p>"
                     + _comparison_html("delta-table", summary["delta"], pairs, metrics, null=0.0, rate=False)
                     + legend.format("0") + "</section>")
    if notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        parts.append(f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>')
    figures = "".join(
        f'<figure data-metric="{_e(metric)}"><img src="{_data_uri(plots[metric], "image/png")}" '
        f'alt="{_e(metric)} distribution"><figcaption>{_e(metric)}</figcaption></figure>' for metric in metrics)
    parts.append(f'<section id="distributions"><h2>Score distributions</h2>{figures}</section>')
    if grid_rows:
        grid = _grid_html(grid_rows, models, table, metrics, cell)
        parts.append(f'<section id="samples"><h2>Samples</h2>{grid}</section>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# --- Markdown -------------------------------------------------------------------------------------------

def _md(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(_md(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(*, title: str, summary: Mapping, metrics: Sequence[str], models: Sequence[str],
                    protocol: Mapping[str, object], notes: Sequence[str]) -> str:
    pairs = _pairs(summary, models)
    out = [f"# {_md(title)}", "", _interval_note(summary), "", "## Protocol", "",
           _md_table(["setting", "value"], [(k, _protocol_value(v)) for k, v in protocol.items()]), "",
           "## Scores", "", "Mean per model [interval].", "",
           _md_table(["metric", *models],
                     [[metric, *(format_estimate(*_estimate(summary["models"].get(m), metric)) for m in models)]
                      for metric in metrics])]
    for section, heading, null, rate in (("win_rate", "Paired win rates", 0.5, True),
                                         ("delta", "Mean differences", 0.0, False)):
        if not pairs or not summary.get(section):
            continue
        rows = []
        for metric in metrics:
            row = [metric]
            for key, _ in pairs:
                value, low, high = _estimate(summary[section].get(key), metric)
                text = format_estimate(value, low, high, rate=rate)
                row.append(f"**{text}**" if _excludes(low, high, null) else text)
            rows.append(row)
        out += ["", f"## {heading}", "", f"Bold: the interval excludes {null:g}.", "",
                _md_table(["metric", *(label for _, label in pairs)], rows)]
    if notes:
        out += ["", "## Notes", "", *(f"- {_md(n)}" for n in notes)]
    return "\n".join(out) + "\n"


# --- entry point ----------------------------------------------------------------------------------------

def write_report(out_dir: Path, *, title: str, summary: dict, table: pd.DataFrame, metrics: Sequence[str],
                 models: Sequence[str], grid_rows: Sequence[GridRow], protocol: Mapping[str, object],
                 notes: Sequence[str] = (), cell: int = 160) -> ReportFiles:
    """Write report.html, summary.md, plots/<metric>.png and distributions/<metric>.csv under `out_dir`
    (each atomically; report.html last). `summary` is `statistics.summarise`'s result (or its JSON)."""
    out_dir = Path(out_dir)
    models, metrics = list(models), list(metrics)
    for metric in metrics:
        if not _SAFE_NAME.fullmatch(metric) or metric in (".", ".."):
            raise ValueError(f"metric name {metric!r} cannot be a file name (letters, digits, _ . - only)")
    absent = [m for m in models if m not in summary.get("models", {})]
    if absent:
        raise ValueError(f"summary has no entry for model(s) {absent}")
    missing = [c for c in ("model", *metrics) if c not in table.columns]
    if missing:
        raise ValueError(f"score table lacks column(s) {missing}")
    _check_rows(grid_rows, models)
    per_model = {m: table.loc[table["model"] == m, metrics].to_numpy(dtype=float) for m in models}
    empty = [m for m, v in per_model.items() if len(v) == 0]
    if empty:
        raise ValueError(f"score table has no rows for model(s) {empty}")
    for m, v in per_model.items():
        if not np.isfinite(v).all():
            raise ValueError(f"score table has non-finite scores for model {m!r}")

    plots, distributions, pngs = [], [], {}
    for j, metric in enumerate(metrics):
        scores = {m: per_model[m][:, j] for m in models}
        csv_path = out_dir / "distributions" / f"{metric}.csv"
        _write_quantiles(csv_path, quantile_rows(scores))
        distributions.append(csv_path)
        pngs[metric] = distribution_plot(scores, metric, summary)
        png_path = out_dir / "plots" / f"{metric}.png"
        _write_bytes(png_path, pngs[metric])
        plots.append(png_path)
    markdown = out_dir / "summary.md"
    _write_text(markdown, render_markdown(title=title, summary=summary, metrics=metrics, models=models,
                                          protocol=protocol, notes=notes))
    page = out_dir / "report.html"
    _write_text(page, render_html(title=title, summary=summary, metrics=metrics, models=models,
                                  grid_rows=grid_rows, protocol=protocol, notes=notes, plots=pngs,
                                  table=table, cell=cell))
    return ReportFiles(html=page, markdown=markdown, plots=plots, distributions=distributions)

