"""Validate the preference pairs (Pick-a-Pic format) before anything trains on them.

Three layers, each reported per column in `report.json` (written even when the data fails):
1. schema, GX built-ins on a sample of rows (JPEG columns included): required columns exist, with
   the right types (`expect_column_to_exist`, `expect_column_values_to_be_in_type_list`);
2. a GX suite on all rows (JPEG columns left out, for speed): label rules, non-empty captions, unique
   ids, row count, tie fraction (only on columns that passed the schema check, so GX never sees a
   missing column);
3. the same sample of the JPEG bytes decoded with PIL.
Failures raise DataValidationError whose message names every failing column and rule. Both GX runs
can also be written as GX Data Docs (`write_data_docs`).
"""

from __future__ import annotations

import html
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spo.config import Config

REPORT_FILE = "report.json"
HTML_FILE = "report.html"
DATA_DOCS_DIR = "data_docs"
IMAGE_SAMPLE = 32  # rows sampled for the schema check and the JPEG decoding
LABEL_VALUES = [0.0, 0.5, 1.0]

# Pick-a-Pic columns the pipeline reads, with the type family each must have.
REQUIRED_COLUMNS = {"caption": "string", "jpg_0": "binary", "jpg_1": "binary",
                    "label_0": "float", "label_1": "float"}
ID_COLUMNS = {"ranking_id": "integer", "image_0_uid": "string", "image_1_uid": "string"}
COLUMN_FAMILIES = {**REQUIRED_COLUMNS, **ID_COLUMNS}
# What a column of each family is once the parquet is read into pandas: numeric dtypes are checked by
# GX on the dtype, object columns (strings, see `_frame`; bytes) value by value on the Python type.
TYPE_LISTS = {"string": ["str"], "binary": ["bytes"], "float": ["float16", "float32", "float64"],
              "integer": ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]}


class DataValidationError(ValueError):
    """The pairs file broke at least one rule; the message lists each failing column and rule."""


def _entry(rule: str, column: str | None, success: bool, **details: Any) -> dict[str, Any]:
    return {"expectation": rule, "column": column, "success": bool(success), **details}


def _frame(table: pa.Table) -> pd.DataFrame:
    """The table in pandas, strings as object columns: GX 1.24's type-list check matches pandas 3's
    `str` dtype to no type name, while on an object column it checks each value's Python type."""
    frame = table.to_pandas()
    return frame.astype({c: object for c, dtype in frame.dtypes.items() if isinstance(dtype, pd.StringDtype)})


def sample_rows(n: int, sample: int = IMAGE_SAMPLE) -> list[int]:
    """Up to `sample` evenly spaced row indices of an n-row table, first and last included."""
    return sorted({round(i * (n - 1) / max(sample - 1, 1)) for i in range(min(sample, n))})


def _schema_suite(columns: Sequence[str]) -> list[Any]:
    """Every required column exists; each present required or id column has its family's type."""
    import great_expectations as gx

    e = gx.expectations
    return ([e.ExpectColumnToExist(column=c) for c in REQUIRED_COLUMNS]
            + [e.ExpectColumnValuesToBeInTypeList(column=c, type_list=TYPE_LISTS[family])
               for c, family in COLUMN_FAMILIES.items() if c in columns])


def check_schema(context: Any, sample: pa.Table) -> list[dict[str, Any]]:
    """One entry per required column (exists) and per present required or id column (type), checked
    by GX on a sample of rows; plus the id rule (ranking_id, or both image uids), which no GX
    expectation expresses (it is an either/or over column names)."""
    entries = run_suite(context, "schema", _schema_suite(sample.column_names), _frame(sample))
    for entry in entries:
        entry["expected_type"] = COLUMN_FAMILIES[entry["column"]]
        if entry["expectation"] == "expect_column_to_exist" and not entry["success"]:
            entry["observed_type"] = "missing"
    present = set(sample.column_names)
    has_ids = "ranking_id" in present or {"image_0_uid", "image_1_uid"} <= present
    entries.append(_entry("id_columns_exist", "ranking_id|image_0_uid,image_1_uid", has_ids,
                          observed_value=sorted(set(ID_COLUMNS) & present)))
    return entries


def _suite(cfg: Config, usable: set[str]) -> list[Any]:
    """The GX expectations that apply to the columns which passed the schema check."""
    import great_expectations as gx

    e = gx.expectations
    out: list[Any] = [e.ExpectTableRowCountToBeBetween(min_value=cfg.validate.min_rows)]
    for label in ("label_0", "label_1"):
        if label in usable:
            out += [e.ExpectColumnValuesToNotBeNull(column=label),
                    e.ExpectColumnValuesToBeInSet(column=label, value_set=LABEL_VALUES)]
    if {"label_0", "label_1"} <= usable:
        out += [e.ExpectMulticolumnSumToEqual(column_list=["label_0", "label_1"], sum_total=1.0),
                e.ExpectColumnValuesToNotBeInSet(column="label_0", value_set=[0.5],
                                                 mostly=max(0.0, 1.0 - cfg.validate.max_tie_fraction))]
    if "caption" in usable:
        out += [e.ExpectColumnValuesToNotBeNull(column="caption"),
                e.ExpectColumnValuesToNotMatchRegex(column="caption", regex=r"^\s*$")]
    if "ranking_id" in usable:
        out.append(e.ExpectColumnValuesToBeUnique(column="ranking_id"))
    if {"image_0_uid", "image_1_uid"} <= usable:
        out.append(e.ExpectCompoundColumnsToBeUnique(column_list=["image_0_uid", "image_1_uid"]))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def gx_context(root: Path) -> Any:
    """A GX file context under `root` (a temp dir): no analytics, no progress bars, Data Docs on disk."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.data_sources.add_pandas("pickapic").add_dataframe_asset("pairs").add_batch_definition_whole_dataframe("all")
    return context


def run_suite(context: Any, name: str, expectations: list[Any], frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Run one GX suite on `frame` (the result is kept for Data Docs); one report entry per expectation."""
    import great_expectations as gx

    batch_def = context.data_sources.get("pickapic").get_asset("pairs").get_batch_definition("all")
    suite = context.suites.add(gx.ExpectationSuite(name=name, expectations=expectations))
    validation = context.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch_def, suite=suite))
    result = validation.run(batch_parameters={"dataframe": frame}).to_json_dict()
    entries = []
    for item in result["results"]:
        kwargs = {k: v for k, v in item["expectation_config"]["kwargs"].items() if k != "batch_id"}
        column = kwargs.pop("column", None) or ",".join(kwargs.pop("column_list", []) or []) or None
        details = {k: item["result"][k] for k in ("unexpected_count", "unexpected_percent", "observed_value",
                                                   "element_count") if k in item["result"]}
        examples = item["result"].get("partial_unexpected_list")
        if examples:
            details["unexpected_examples"] = examples[:10]
        if item["exception_info"].get("raised_exception"):
            details["exception"] = item["exception_info"]["exception_message"]
        entries.append(_entry(item["expectation_config"]["type"], column, item["success"], **kwargs, **details))
    return _jsonable(entries)


def check_images(table: pa.Table, columns: Sequence[str]) -> list[dict[str, Any]]:
    """Decode an evenly spaced sample of each JPEG column; report the rows that fail."""
    entries = []
    rows = sample_rows(table.num_rows)
    for column in columns:
        values = table.column(column)
        bad = []
        for row in rows:
            data = values[row].as_py()
            try:
                with Image.open(io.BytesIO(data or b"")) as image:
                    image.load()
            except Exception as err:  # PIL raises several types for bad bytes
                bad.append({"row": row, "error": f"{type(err).__name__}: {err}"[:200]})
        entries.append(_entry("images_decodable", column, not bad, element_count=len(rows),
                              unexpected_count=len(bad), unexpected_examples=bad[:10]))
    return entries


def describe_failures(pairs_path: Path, entries: list[dict[str, Any]]) -> str:
    """A readable list of every failing rule, column first."""
    lines = [f"data validation failed for {pairs_path}:"]
    for entry in entries:
        if entry["success"]:
            continue
        where = f"column '{entry['column']}'" if entry["column"] else "table"
        facts = [f"{k}={entry[k]}" for k in ("expected_type", "observed_type", "observed_value", "unexpected_count",
                                             "value_set", "min_value", "mostly", "exception") if k in entry]
        if entry.get("unexpected_examples"):
            facts.append(f"e.g. {entry['unexpected_examples'][:3]}")
        lines.append(f"  - {where}: {entry['expectation']} failed ({', '.join(facts)})")
    return "\n".join(lines)


def write_data_docs(context: Any, out_dir: Path) -> None:
    """GX Data Docs of the schema and rules runs: index.html, expectations/, validations/.

    GX's `static/` is left out: the pages take their CSS and JS from CDNs (and GX's logo from its S3
    bucket, whatever the analytics setting), and static/ holds only fonts, logos and tutorial GIFs (4 MB).
    Offline the pages are unstyled but complete; `report.html` (below) needs nothing from the network.
    """
    context.build_data_docs()
    site_dir = context.variables.data_docs_sites["local_site"]["store_backend"]["base_directory"]
    shutil.copytree(Path(context.root_directory) / site_dir, out_dir, ignore=shutil.ignore_patterns("static"))


def _html(report: dict[str, Any]) -> str:
    """A self-contained one-table page of every rule, GX or not: the KFP HTML artifact (one file), with
    a link to the GX Data Docs beside it."""
    def details(entry: dict[str, Any]) -> str:
        rest = {k: v for k, v in entry.items() if k not in ("success", "column", "expectation")}
        return html.escape(json.dumps(rest, default=str))

    rows = "".join(
        f"<tr class={'ok' if e['success'] else 'bad'}><td>{'PASS' if e['success'] else 'FAIL'}</td>"
        f"<td>{html.escape(str(e['column']))}</td><td>{html.escape(e['expectation'])}</td><td>{details(e)}</td></tr>"
        for e in report["expectations"])
    return ("<html><head><meta charset='utf-8'><title>pairs validation</title><style>"
            ".ok{background:#e6ffe6}.bad{background:#ffe6e6}td{padding:4px;font-family:monospace}</style></head>"
            f"<body><h1>{'PASSED' if report['success'] else 'FAILED'}: {html.escape(report['pairs'])}</h1>"
            f"<p>{report['row_count']} rows; GX Data Docs: <a href='{DATA_DOCS_DIR}/index.html'>"
            f"{DATA_DOCS_DIR}/index.html</a></p><table><tr><th></th><th>column</th><th>rule</th><th>details</th></tr>"
            f"{rows}</table></body></html>")


def validate_pairs(cfg: Config, pairs_path: Path, data_docs_dir: Path | None = None) -> dict[str, Any]:
    """The full report for one parquet file; writes nothing but the GX Data Docs, if `data_docs_dir`."""
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs file not found: {pairs_path}")
    try:
        table = pq.read_table(pairs_path)
    except (pa.ArrowException, OSError) as err:
        raise DataValidationError(f"{pairs_path}: not a readable parquet file: {err}") from err
    with tempfile.TemporaryDirectory(prefix="gx-") as root:
        context = gx_context(Path(root))
        entries = check_schema(context, table.take(sample_rows(table.num_rows)))
        failed = {e["column"] for e in entries if not e["success"]}
        usable = (set(COLUMN_FAMILIES) & set(table.column_names)) - failed
        rows = table.select([c for c in table.column_names if not c.startswith("jpg_")])
        entries += run_suite(context, "rules", _suite(cfg, usable), _frame(rows))
        if data_docs_dir is not None:
            write_data_docs(context, data_docs_dir)
    entries += check_images(table, [c for c in ("jpg_0", "jpg_1") if c in usable])
    return {"pairs": str(pairs_path), "row_count": table.num_rows, "success": all(e["success"] for e in entries),
            "expectations": entries}
