"""Validate the preference pairs (Pick-a-Pic format) before anything trains on them.

Three layers, each reported per column in `report.json` (written even when the data fails):
1. schema, from the parquet footer (pyarrow): required columns present with the right types;
2. a great_expectations suite on the rows: label rules, non-empty captions, unique ids, row count,
   tie fraction (only on columns that passed the schema check, so GX never sees a missing column);
3. a sample of the JPEG bytes decoded with PIL.
Failures raise DataValidationError whose message names every failing column and rule.
"""

from __future__ import annotations

import html
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spo.config import Config

REPORT_FILE = "report.json"
HTML_FILE = "report.html"
IMAGE_SAMPLE = 32  # JPEGs decoded per image column
LABEL_VALUES = [0.0, 0.5, 1.0]

# Pick-a-Pic columns the pipeline reads, with the Arrow type family each must have.
REQUIRED_COLUMNS = {"caption": "string", "jpg_0": "binary", "jpg_1": "binary",
                    "label_0": "float", "label_1": "float"}
ID_COLUMNS = {"ranking_id": "integer", "image_0_uid": "string", "image_1_uid": "string"}


class DataValidationError(ValueError):
    """The pairs file broke at least one rule; the message lists each failing column and rule."""


def _type_family(arrow_type: pa.DataType) -> str:
    checks = {"string": (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view),
              "binary": (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view),
              "float": (pa.types.is_floating,), "integer": (pa.types.is_integer,)}
    for family, predicates in checks.items():
        if any(p(arrow_type) for p in predicates):
            return family
    return str(arrow_type)


def _entry(rule: str, column: str | None, success: bool, **details: Any) -> dict[str, Any]:
    return {"expectation": rule, "column": column, "success": bool(success), **details}


def check_schema(schema: pa.Schema) -> list[dict[str, Any]]:
    """One entry per required column: present, and of the expected type family."""
    present = {name: _type_family(schema.field(name).type) for name in schema.names}
    entries = []
    for column, family in {**REQUIRED_COLUMNS, **{c: t for c, t in ID_COLUMNS.items() if c in present}}.items():
        found = present.get(column)
        entries.append(_entry("column_exists_with_type", column, found == family, expected_type=family,
                              observed_type=found or "missing"))
    has_ids = "ranking_id" in present or {"image_0_uid", "image_1_uid"} <= set(present)
    entries.append(_entry("id_columns_exist", "ranking_id|image_0_uid,image_1_uid", has_ids,
                          observed_value=sorted(set(ID_COLUMNS) & set(present))))
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


def run_expectations(cfg: Config, table: pa.Table, usable: set[str]) -> list[dict[str, Any]]:
    """Run the GX suite on an ephemeral context; one report entry per expectation."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch_def = (context.data_sources.add_pandas("pickapic").add_dataframe_asset("pairs")
                 .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(gx.ExpectationSuite(name="pairs", expectations=_suite(cfg, usable)))
    validation = context.validation_definitions.add(gx.ValidationDefinition(name="pairs", data=batch_def, suite=suite))
    frame = table.select([c for c in table.column_names if not c.startswith("jpg_")]).to_pandas()
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


def check_images(table: pa.Table, columns: Sequence[str], sample: int = IMAGE_SAMPLE) -> list[dict[str, Any]]:
    """Decode an evenly spaced sample of each JPEG column; report the rows that fail."""
    entries = []
    n = table.num_rows
    rows = sorted({round(i * (n - 1) / max(sample - 1, 1)) for i in range(min(sample, n))})
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


def _html(report: dict[str, Any]) -> str:
    """A one-table page (the KFP HTML artifact; GX data docs need a file context)."""
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
            f"<p>{report['row_count']} rows</p><table><tr><th></th><th>column</th><th>rule</th><th>details</th></tr>"
            f"{rows}</table></body></html>")


def validate_pairs(cfg: Config, pairs_path: Path) -> dict[str, Any]:
    """The full report for one parquet file (no writes)."""
    if not pairs_path.is_file():
        raise FileNotFoundError(f"pairs file not found: {pairs_path}")
    try:
        schema = pq.read_schema(pairs_path)
        table = pq.read_table(pairs_path)
    except (pa.ArrowException, OSError) as err:
        raise DataValidationError(f"{pairs_path}: not a readable parquet file: {err}") from err
    entries = check_schema(schema)
    usable = {e["column"] for e in entries if e["success"] and e["expectation"] == "column_exists_with_type"}
    entries += run_expectations(cfg, table, usable)
    entries += check_images(table, [c for c in ("jpg_0", "jpg_1") if c in usable])
    return {"pairs": str(pairs_path), "row_count": table.num_rows, "success": all(e["success"] for e in entries),
            "expectations": entries}
