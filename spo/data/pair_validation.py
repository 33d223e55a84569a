"""Validate the preference pairs (Pick-a-Pic format) before anything trains on them.

A few bad rows in a large scraped dataset are normal; a dataset that is mostly bad, or the wrong shape,
is not. So the check works at two levels:

- **rows**: every row of every shard is checked (`RULES`: both JPEGs fully decoded, labels, caption, a
  repeated id). A bad row is *quarantined* (written to `quarantine.parquet` with its shard, row and
  reasons, see spo.data.quarantine), not fatal; training skips it.
- **tables**: a missing or mistyped column fails its whole shard (nothing to quarantine row by row); too
  many quarantined rows (`validate.max_bad_fraction`, per split and overall), too few good rows
  (`validate.min_rows`, train split) or too many ties (`validate.max_tie_fraction`) fail the stage.

Shards are streamed in batches of `BATCH_ROWS` rows (a real Pick-a-Pic copy is 200 GB): the JPEGs of each
batch are decoded in a pool of worker processes while this process checks the cheap columns; a bounded
window of batches in flight keeps memory flat. Great Expectations then states the same rules as a suite
per split over the table without image bytes, with each row check's result fed in as a column (e.g.
`jpg_0_decodable`), so its Data Docs show every rule with counts that equal the quarantine's, and its
verdict (row rules carry `mostly = 1 - max_bad_fraction`) agrees with the stage's.

This module must stay torch-free: the image workers import it.
"""

from __future__ import annotations

import html
import io
import json
import math
import multiprocessing
import os
import re
import shutil
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from spo.data.prepared_layout import EVAL_SPLIT, TRAIN_SPLIT, split_shards
from spo.data.quarantine import QUARANTINE_FILE, REASON_SEPARATOR, quarantine_schema

if TYPE_CHECKING:
    from spo.config import Config

REPORT_FILE = "report.json"
HTML_FILE = "report.html"
METRICS_FILE = "metrics.json"
DATA_DOCS_DIR = "data_docs"
LABEL_VALUES = [0.0, 0.5, 1.0]
LABEL_PAIRS = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
# Row rules, in the order a row's reasons are listed.
RULES = ("image_undecodable", "label_nan", "label_invalid", "label_sum", "caption_empty", "caption_too_long",
         "duplicate_id")
BATCH_ROWS = 128  # rows per image job: ~40 MB of 512-1024 px JPEGs, and enough jobs to keep every worker busy
MAX_WORKERS = 8
QUARANTINE_SAMPLE = 50  # quarantined rows listed in report.json / report.html

# Pick-a-Pic columns the pipeline reads, with the type family each must have.
REQUIRED_COLUMNS = {"caption": "string", "jpg_0": "binary", "jpg_1": "binary",
                    "label_0": "float", "label_1": "float"}
ID_COLUMNS = {"ranking_id": "integer", "image_0_uid": "string", "image_1_uid": "string"}
COLUMN_FAMILIES = {**REQUIRED_COLUMNS, **ID_COLUMNS}
# What a column of each family is in the GX frame: numeric dtypes are checked by GX on the dtype, object
# columns (strings, see `_gx_frame`; integers with nulls) value by value on the Python type.
TYPE_LISTS = {"string": ["str"], "binary": ["bytes"], "float": ["float16", "float32", "float64"],
              "integer": ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "int"]}
# The columns each row rule feeds to GX: True where the row passes (caption_length: the value itself).
CHECK_COLUMNS = ("jpg_0_decodable", "jpg_1_decodable", "labels_finite", "labels_in_set", "labels_sum_to_one",
                 "caption_non_empty", "caption_length", "id_first", "quarantined")


class DataValidationError(ValueError):
    """The pairs failed the stage: each line of the message names one rule, with its shard or counts."""


# ----------------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class Shard:
    path: Path
    split: str

    @property
    def name(self) -> str:
        return self.path.name


def find_shards(pairs: Path) -> list[Shard]:
    """Every shard of both splits of a prepared pairs directory, in order; or one parquet file (as train)."""
    pairs = Path(pairs)
    if pairs.is_file():
        return [Shard(pairs, TRAIN_SPLIT)]
    if not pairs.is_dir():
        raise FileNotFoundError(f"pairs not found: {pairs}")
    shards = [Shard(p, split) for split in (TRAIN_SPLIT, EVAL_SPLIT) for p in split_shards(pairs, split)]
    if not any(s.split == TRAIN_SPLIT for s in shards):
        raise FileNotFoundError(f"no train shards in {pairs} (expected {TRAIN_SPLIT}-00000.parquet, ...)")
    return shards


def arrow_family(dtype: pa.DataType) -> str:
    """The type family (COLUMN_FAMILIES) of an arrow type, or the type's own name."""
    t = pa.types
    if t.is_string(dtype) or t.is_large_string(dtype) or t.is_string_view(dtype):
        return "string"
    if t.is_binary(dtype) or t.is_large_binary(dtype) or t.is_binary_view(dtype) or t.is_fixed_size_binary(dtype):
        return "binary"
    if t.is_floating(dtype):
        return "float"
    if t.is_integer(dtype):
        return "integer"
    return str(dtype)


def schema_problems(schema: pa.Schema) -> list[tuple[str, str]]:
    """(column, problem) for each required column missing or mistyped, each id column mistyped, and a
    missing id (ranking_id, or both image uids): any of them fails the whole shard."""
    out = [(c, "missing required column") for c in REQUIRED_COLUMNS if c not in schema.names]
    for column, family in COLUMN_FAMILIES.items():
        if column in schema.names and arrow_family(schema.field(column).type) != family:
            out.append((column, f"has type {schema.field(column).type}, expected {family}"))
    if "ranking_id" not in schema.names and not {"image_0_uid", "image_1_uid"} <= set(schema.names):
        out.append(("ranking_id", "missing id column: needs ranking_id, or both image_0_uid and image_1_uid"))
    return out


# ----------------------------------------------------------------------------------------------------
# images (run in worker processes: keep this torch-free and picklable)


def image_error(data: bytes | None) -> str | None:
    """Why these bytes are not a usable image (open, full decode, RGB), or None when they are."""
    if data is None:
        return "missing (null)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            image.convert("RGB")
    except Exception as err:  # PIL raises many types for bad bytes
        message = re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(err).__name__}: {err}")  # no addresses: same file each run
        return message[:200]
    return None


def check_images(columns: tuple[list[bytes | None], ...]) -> list[tuple[str | None, ...]]:
    """One batch's JPEG columns -> per row, each column's error (None: decodes)."""
    return [tuple(image_error(data) for data in row) for row in zip(*columns)]


def image_workers() -> int:
    """One worker process per usable core, at most MAX_WORKERS."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_WORKERS, cores))


class _InProcess:
    """The executor interface, run here (workers=0): a debugger sees the decoding."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        future.set_result(fn(*args))
        return future


@contextmanager
def _executor(workers: int) -> Iterator[Any]:
    if workers == 0:
        yield _InProcess()
        return
    ctx = multiprocessing.get_context("spawn")  # fork of a process holding threads (GX, arrow) can deadlock
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        yield pool


# ----------------------------------------------------------------------------------------------------
# row rules


def row_checks(cheap: pd.DataFrame, image_errors: Sequence[tuple[str | None, ...]],
               max_caption_length: int, repeats: np.ndarray) -> pd.DataFrame:
    """The CHECK_COLUMNS of one batch (cheap = its columns without images)."""
    l0 = cheap["label_0"].to_numpy(dtype=float, na_value=np.nan)
    l1 = cheap["label_1"].to_numpy(dtype=float, na_value=np.nan)
    finite0, finite1 = np.isfinite(l0), np.isfinite(l1)
    in_set = (~finite0 | np.isin(l0, LABEL_VALUES)) & (~finite1 | np.isin(l1, LABEL_VALUES))
    caption = cheap["caption"].astype(object).where(cheap["caption"].notna(), "")
    checks = pd.DataFrame({
        "jpg_0_decodable": np.array([e[0] is None for e in image_errors], dtype=bool),
        "jpg_1_decodable": np.array([e[1] is None for e in image_errors], dtype=bool),
        "labels_finite": finite0 & finite1,
        "labels_in_set": in_set,
        "labels_sum_to_one": ~(finite0 & finite1) | (l0 + l1 == 1.0),
        "caption_non_empty": np.array([bool(c.strip()) for c in caption], dtype=bool),
        "caption_length": np.array([len(c) for c in caption], dtype=np.int64),
        "id_first": ~repeats,
    }, index=cheap.index)
    flags = rule_flags(checks, max_caption_length)
    checks["quarantined"] = np.logical_or.reduce([flags[r] for r in RULES])
    return checks


def rule_flags(checks: pd.DataFrame, max_caption_length: int) -> dict[str, np.ndarray]:
    """Rule name -> True where the row breaks it."""
    c = {name: checks[name].to_numpy() for name in checks.columns}
    return {"image_undecodable": ~(c["jpg_0_decodable"] & c["jpg_1_decodable"]),
            "label_nan": ~c["labels_finite"], "label_invalid": ~c["labels_in_set"],
            "label_sum": ~c["labels_sum_to_one"], "caption_empty": ~c["caption_non_empty"],
            "caption_too_long": c["caption_length"] > max_caption_length, "duplicate_id": ~c["id_first"]}


def id_keys(cheap: pd.DataFrame) -> list[Any]:
    """Each row's pair id: ranking_id, or (image_0_uid, image_1_uid) where there is no ranking_id; None if null."""
    if "ranking_id" in cheap.columns:
        return [None if v is None or (isinstance(v, float) and math.isnan(v)) else int(v)
                for v in cheap["ranking_id"].tolist()]
    return [None if pd.isna(a) or pd.isna(b) else (a, b)
            for a, b in zip(cheap["image_0_uid"].tolist(), cheap["image_1_uid"].tolist())]


def _label_text(value: float) -> str:
    return "null" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:g}"


def row_detail(i: int, cheap: pd.DataFrame, checks: pd.DataFrame, errors: tuple[str | None, ...],
               first_seen: str | None, max_caption_length: int) -> str:
    """What was wrong with row i, for a person reading the quarantine."""
    parts = [f"{column}: {error}" for column, error in zip(IMAGE_COLUMNS, errors) if error]
    row = checks.iloc[i]
    if not (row["labels_finite"] and row["labels_in_set"] and row["labels_sum_to_one"]):
        parts.append(f"labels ({_label_text(cheap['label_0'].iloc[i])}, {_label_text(cheap['label_1'].iloc[i])})")
    if not row["caption_non_empty"]:
        parts.append("caption is null" if pd.isna(cheap["caption"].iloc[i]) else "caption is blank")
    if row["caption_length"] > max_caption_length:
        parts.append(f"caption has {row['caption_length']} characters (max {max_caption_length})")
    if first_seen:
        parts.append(f"id first seen at {first_seen}")
    return REASON_SEPARATOR.join(parts)


# ----------------------------------------------------------------------------------------------------
# the scan


@dataclass
class SplitTally:
    """What one split's scan found."""

    rows: int = 0
    quarantined: int = 0
    good_ties: int = 0
    counts: Counter = field(default_factory=Counter)
    shards: list[str] = field(default_factory=list)
    frames: list[pd.DataFrame] = field(default_factory=list)  # the GX frame, batch by batch
    seen: dict[Any, int] = field(default_factory=dict)  # pair id -> where first seen: shard ordinal << 32 | row

    @property
    def good_rows(self) -> int:
        return self.rows - self.quarantined

    def summary(self) -> dict[str, Any]:
        return {"rows": self.rows, "good_rows": self.good_rows, "quarantined": self.quarantined, "ties": self.good_ties,
                "bad_fraction": self.quarantined / self.rows if self.rows else 0.0,
                "tie_fraction": self.good_ties / self.good_rows if self.good_rows else 0.0,
                "counts": {rule: self.counts[rule] for rule in RULES}, "shards": self.shards}


def _gx_columns(names: Sequence[str]) -> list[str]:
    return [c for c in COLUMN_FAMILIES if c in names and c not in IMAGE_COLUMNS]


class PairScan:
    """Streams the shards once: checks every row, writes the quarantined ones, tallies each split."""

    def __init__(self, cfg: Config, shards: Sequence[Shard], quarantine_path: Path, workers: int) -> None:
        self.cfg, self.workers = cfg, workers
        self.tallies = {split: SplitTally() for split in dict.fromkeys(s.split for s in shards)}
        self.failures: list[dict[str, Any]] = []  # whole-shard failures
        self.sample: list[dict[str, Any]] = []
        self.shards = [s for s in shards if self._schema_ok(s)]
        self.quarantine_path = quarantine_path
        self.schema = quarantine_schema(self._rows_schema())

    def _fail(self, shard: Shard, column: str | None, problem: str) -> None:
        self.failures.append({"expectation": "shard_schema", "column": column, "success": False, "shard": shard.name,
                              "split": shard.split, "problem": problem})

    def _schema_ok(self, shard: Shard) -> bool:
        try:
            schema = pq.read_schema(shard.path)
        except (pa.ArrowException, OSError) as err:
            self._fail(shard, None, f"not a readable parquet file: {err}")
            return False
        problems = schema_problems(schema)
        for column, problem in problems:
            self._fail(shard, column, f"{problem} '{column}'" if problem.startswith("missing required")
                       else f"column '{column}' {problem}")
        return not problems

    def _rows_schema(self) -> pa.Schema:
        """The shards' columns together (a column some shards lack is null there in the quarantine)."""
        schemas = [pq.read_schema(s.path).remove_metadata() for s in self.shards]
        try:
            return pa.unify_schemas(schemas, promote_options="permissive") if schemas else pa.schema([])
        except pa.ArrowException as err:
            raise DataValidationError(f"validate: shards have incompatible column types: {err}") from err

    def _batches(self) -> Iterator[tuple[Shard, int, pa.RecordBatch]]:
        for shard in self.shards:
            self.tallies[shard.split].shards.append(shard.name)
            row0 = 0
            try:
                for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=BATCH_ROWS):
                    yield shard, row0, batch
                    row0 += batch.num_rows
            except (pa.ArrowException, OSError) as err:
                self._fail(shard, None, f"unreadable after row {row0}: {err}")

    def run(self) -> None:
        """Decode each batch's JPEGs in the pool, at most a bounded window of batches ahead of the checks."""
        from spo.tracking.progress import progress

        total = sum(pq.ParquetFile(s.path).metadata.num_rows for s in self.shards)
        window = 2 * self.workers + 1
        with (pq.ParquetWriter(self.quarantine_path, self.schema) as writer, _executor(self.workers) as pool,
              progress(desc="validate", total=total, unit="row") as bar):
            pending: deque = deque()
            for shard, row0, batch in self._batches():
                images = tuple(batch.column(c).to_pylist() for c in IMAGE_COLUMNS)
                pending.append((shard, row0, batch, pool.submit(check_images, images)))
                while len(pending) >= window or (pending and pending[0][3].done()):
                    self._take(writer, bar, *pending.popleft())
            while pending:
                self._take(writer, bar, *pending.popleft())

    def _take(self, writer: pq.ParquetWriter, bar: Any, shard: Shard, row0: int, batch: pa.RecordBatch,
              future: Future) -> None:
        errors = future.result()
        tally = self.tallies[shard.split]
        cheap = batch.select([c for c in batch.schema.names if c not in IMAGE_COLUMNS]).to_pandas(
            integer_object_nulls=True)
        first_seen = self._repeats(tally, shard, row0, cheap)
        repeats = np.array([f is not None for f in first_seen], dtype=bool)
        checks = row_checks(cheap, errors, self.cfg.validate.max_caption_length, repeats)
        flags = rule_flags(checks, self.cfg.validate.max_caption_length)
        bad = np.flatnonzero(checks["quarantined"].to_numpy())
        tally.rows += batch.num_rows
        tally.quarantined += len(bad)
        tally.counts.update({rule: int(flags[rule].sum()) for rule in RULES})
        good = ~checks["quarantined"].to_numpy()
        tally.good_ties += int((cheap["label_0"].to_numpy(dtype=float, na_value=np.nan)[good] == 0.5).sum())
        frame = cheap[_gx_columns(cheap.columns)].copy()
        frame.insert(0, "row", np.arange(row0, row0 + batch.num_rows, dtype=np.int64))
        frame.insert(0, "shard", shard.name)
        tally.frames.append(pd.concat([frame, checks], axis=1))
        if len(bad):
            reasons = [REASON_SEPARATOR.join(r for r in RULES if flags[r][i]) for i in bad]
            details = [row_detail(i, cheap, checks, errors[i], first_seen[i], self.cfg.validate.max_caption_length)
                       for i in bad]
            writer.write_table(self._quarantine_rows(shard, row0, batch, bad, reasons, details))
            room = max(0, QUARANTINE_SAMPLE - len(self.sample))
            self.sample += [{"shard": shard.name, "row": row0 + int(i), "split": shard.split, "reasons": r,
                             "detail": d} for i, r, d in zip(bad[:room], reasons, details)]
        bar.update(batch.num_rows)
        bar.set_postfix(quarantined=sum(t.quarantined for t in self.tallies.values()), refresh=False)

    def _repeats(self, tally: SplitTally, shard: Shard, row0: int, cheap: pd.DataFrame) -> list[str | None]:
        """Per row, where its id was first seen in this split (None: first time, or no id); the first
        occurrence is kept, later ones are quarantined."""
        ordinal = self.shards.index(shard)
        out: list[str | None] = []
        for i, key in enumerate(id_keys(cheap)):
            earlier = tally.seen.get(key) if key is not None else None
            if key is not None and earlier is None:
                tally.seen[key] = (ordinal << 32) | (row0 + i)  # one int per id: a million ids stay small
            out.append(None if earlier is None else f"{self.shards[earlier >> 32].name} row {earlier & 0xFFFFFFFF}")
        return out

    def _quarantine_rows(self, shard: Shard, row0: int, batch: pa.RecordBatch, bad: np.ndarray,
                         reasons: list[str], details: list[str]) -> pa.Table:
        rows = pa.Table.from_batches([batch]).take(pa.array(bad))
        meta = {"shard": [shard.name] * len(bad), "row": (row0 + bad).tolist(), "split": [shard.split] * len(bad),
                "reasons": reasons, "detail": details}
        columns = [pa.array(meta[f.name], f.type) if f.name in meta
                   else rows.column(f.name).cast(f.type) if f.name in rows.column_names
                   else pa.nulls(len(bad), f.type) for f in self.schema]
        return pa.Table.from_arrays(columns, schema=self.schema)

    def gx_frame(self, split: str) -> pd.DataFrame:
        return _gx_frame(self.tallies[split].frames)


def _gx_frame(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """The split's table for GX, strings as object columns: GX 1.24's type-list check matches pandas 3's
    `str` dtype to no type name, while on an object column it checks each value's Python type."""
    if not frames:
        return pd.DataFrame(columns=["shard", "row", *CHECK_COLUMNS])
    frame = pd.concat(frames, ignore_index=True)
    return frame.astype({c: object for c, dtype in frame.dtypes.items() if isinstance(dtype, pd.StringDtype)})


# ----------------------------------------------------------------------------------------------------
# great_expectations


def gx_context(root: Path) -> Any:
    """A GX file context under `root` (a temp dir): no analytics, no progress bars, Data Docs on disk."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="file", project_root_dir=str(root))
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    context.data_sources.add_pandas("pickapic").add_dataframe_asset("pairs").add_batch_definition_whole_dataframe("all")
    return context


def gx_suite(cfg: Config, split: str, columns: Sequence[str]) -> list[Any]:
    """The rules of one split as GX expectations; `meta.rule` names the stage rule each one states."""
    import great_expectations as gx
    from great_expectations.expectations.row_conditions import Column

    e = gx.expectations
    v = cfg.validate
    rows = {"mostly": 1.0 - v.max_bad_fraction}
    good = {"row_condition": Column("quarantined") == False}  # noqa: E712 (a GX condition, not a comparison)
    out: list[Any] = [e.ExpectColumnToExist(column=c) for c in ("caption", "label_0", "label_1", *CHECK_COLUMNS)]
    out += [e.ExpectColumnValuesToBeInTypeList(column=c, type_list=TYPE_LISTS[COLUMN_FAMILIES[c]])
            for c in _gx_columns(columns)]
    out += [
        e.ExpectColumnPairValuesToBeInSet(column_A="jpg_0_decodable", column_B="jpg_1_decodable",
                                          value_pairs_set=[(True, True)], ignore_row_if="neither", **rows,
                                          meta={"rule": "image_undecodable"}),
        e.ExpectColumnValuesToBeInSet(column="labels_finite", value_set=[True], **rows, meta={"rule": "label_nan"}),
        e.ExpectColumnValuesToBeInSet(column="labels_in_set", value_set=[True], **rows,
                                      meta={"rule": "label_invalid"}),
        e.ExpectColumnValuesToBeInSet(column="labels_sum_to_one", value_set=[True], **rows,
                                      meta={"rule": "label_sum"}),
        e.ExpectColumnValuesToBeInSet(column="caption_non_empty", value_set=[True], **rows,
                                      meta={"rule": "caption_empty"}),
        e.ExpectColumnValuesToBeBetween(column="caption_length", max_value=v.max_caption_length, **rows,
                                        meta={"rule": "caption_too_long"}),
        e.ExpectColumnValuesToBeInSet(column="id_first", value_set=[True], **rows, meta={"rule": "duplicate_id"}),
        # GX's own statement of the three label rules together, on the raw labels (NaN pairs are in no set)
        e.ExpectColumnPairValuesToBeInSet(column_A="label_0", column_B="label_1", value_pairs_set=LABEL_PAIRS,
                                          ignore_row_if="neither", **rows, meta={"rule": "labels"}),
        e.ExpectColumnValuesToBeInSet(column="quarantined", value_set=[False], **rows, meta={"rule": "quarantined"}),
        e.ExpectColumnValuesToNotBeInSet(column="label_0", value_set=[0.5], mostly=1.0 - v.max_tie_fraction, **good,
                                         meta={"rule": "max_tie_fraction"}),
    ]
    if split == TRAIN_SPLIT:
        out.append(e.ExpectTableRowCountToBeBetween(min_value=v.min_rows, **good, meta={"rule": "min_rows"}))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _entry(item: dict[str, Any], split: str) -> dict[str, Any]:
    """One report entry of one GX expectation result."""
    config = item["expectation_config"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
    column = kwargs.pop("column", None) or ",".join(filter(None, [kwargs.pop("column_A", None),
                                                                  kwargs.pop("column_B", None)])) or None
    result = item["result"]
    details = {k: result[k] for k in ("unexpected_count", "unexpected_percent", "observed_value", "element_count")
               if k in result}
    examples = result.get("partial_unexpected_index_list") or result.get("partial_unexpected_list")
    if examples:
        details["unexpected_examples"] = examples[:10]
    if item["exception_info"].get("raised_exception"):
        details["exception"] = item["exception_info"]["exception_message"]
    rule = (config.get("meta") or {}).get("rule")
    return {"expectation": config["type"], "column": column, "success": bool(item["success"]), "split": split,
            **({"rule": rule} if rule else {}), **kwargs, **details}


def run_gx(cfg: Config, frames: dict[str, pd.DataFrame], data_docs_dir: Path, root: Path) -> dict[str, Any]:
    """One suite, validation definition and checkpoint (with UpdateDataDocsAction) per split; the Data Docs
    are copied to `data_docs_dir`. Returns {split: {"success", "entries"}}."""
    import great_expectations as gx

    context = gx_context(root)
    batch_def = context.data_sources.get("pickapic").get_asset("pairs").get_batch_definition("all")
    out: dict[str, Any] = {}
    for split, frame in frames.items():
        suite = context.suites.add(gx.ExpectationSuite(name=f"pairs_{split}",
                                                       expectations=gx_suite(cfg, split, frame.columns)))
        validation = context.validation_definitions.add(gx.ValidationDefinition(name=f"pairs_{split}",
                                                                                data=batch_def, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"validate_{split}", validation_definitions=[validation],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs")],
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": ["shard", "row"]}))
        result = checkpoint.run(batch_parameters={"dataframe": frame})
        entries = [_entry(item, split) for run in result.run_results.values() for item in run.to_json_dict()["results"]]
        out[split] = {"success": bool(result.success), "entries": _jsonable(entries)}
    copy_data_docs(context, data_docs_dir)
    return out


def copy_data_docs(context: Any, out_dir: Path) -> None:
    """The GX Data Docs site (index.html, expectations/, validations/) the checkpoints' action built.

    GX's `static/` is left out: the pages take their CSS and JS from CDNs (and GX's logo from its S3
    bucket, whatever the analytics setting), and static/ holds only fonts, logos and tutorial GIFs (4 MB).
    Offline the pages are unstyled but complete; `report.html` (below) needs nothing from the network.
    """
    site = Path(context.root_directory) / context.variables.data_docs_sites["local_site"]["store_backend"][
        "base_directory"]
    if not (site / "index.html").is_file():  # no split had a readable shard: an empty site still says so
        context.build_data_docs()
    shutil.copytree(site, out_dir, ignore=shutil.ignore_patterns("static"))


# ----------------------------------------------------------------------------------------------------
# verdict, report


def _percent(fraction: float) -> str:
    return f"{100 * fraction:.3g}%"


def table_failures(cfg: Config, splits: dict[str, dict[str, Any]], overall: dict[str, Any],
                   quarantine_shown: str) -> list[str]:
    """One line per failed table rule: too many quarantined rows (each split, and overall), too few good
    train rows, too many ties."""
    v = cfg.validate
    out = []
    scopes = [("", overall)] + ([(f"split {s}: ", t) for s, t in splits.items()] if len(splits) > 1 else [])
    for scope, t in scopes:
        if t["bad_fraction"] > v.max_bad_fraction:
            counts = ", ".join(f"{rule} {n}" for rule, n in t["counts"].items() if n)
            out.append(f"validate: {scope}{t['quarantined']} of {t['rows']} rows ({_percent(t['bad_fraction'])}) "
                       f"quarantined, over validate.max_bad_fraction={v.max_bad_fraction:g}: {counts}; "
                       f"see {quarantine_shown}")
    for split, t in splits.items():
        if split == TRAIN_SPLIT and t["good_rows"] < v.min_rows:
            out.append(f"validate: split {split} has {t['good_rows']} good rows, under validate.min_rows={v.min_rows}")
        if t["tie_fraction"] > v.max_tie_fraction:
            out.append(f"validate: split {split}: {_percent(t['tie_fraction'])} of good rows are ties, over "
                       f"validate.max_tie_fraction={v.max_tie_fraction:g}")
    return out


def _overall(splits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows = sum(t["rows"] for t in splits.values())
    quarantined = sum(t["quarantined"] for t in splits.values())
    good = rows - quarantined
    ties = sum(t["ties"] for t in splits.values())
    return {"rows": rows, "good_rows": good, "quarantined": quarantined, "ties": ties,
            "bad_fraction": quarantined / rows if rows else 0.0, "tie_fraction": ties / good if good else 0.0,
            "counts": {rule: sum(t["counts"][rule] for t in splits.values()) for rule in RULES}}


def metrics(report: dict[str, Any]) -> dict[str, float]:
    """The DVC / MLflow numbers: totals, one count per rule, the same per split (prefixed)."""
    def numbers(t: dict[str, Any], prefix: str) -> dict[str, float]:
        out = {f"{prefix}{k}": float(t[k]) for k in ("rows", "good_rows", "quarantined", "bad_fraction",
                                                      "tie_fraction")}
        out |= {f"{prefix}quarantined_{rule}": float(n) for rule, n in t["counts"].items()}
        out[f"{prefix}duplicates"] = float(t["counts"]["duplicate_id"])
        return out

    out = numbers(report, "")
    out["failed_shards"] = float(len({f["shard"] for f in report["shard_failures"]}))
    for split, t in report["splits"].items():
        out |= numbers(t, f"{split}_")
    return out


def validate_pairs(cfg: Config, pairs: Path, out_dir: Path, *, quarantine_shown: str | None = None,
                   workers: int | None = None) -> dict[str, Any]:
    """Check every row of every shard; write `out_dir/quarantine.parquet` and `out_dir/data_docs/`.

    Returns the report (report.json); `report["failures"]` lists each failed rule, one line each (empty: it
    passed). `quarantine_shown`: how messages name the quarantine file (default: where it is written).
    Raises only for no input at all (FileNotFoundError)."""
    import tempfile

    shards = find_shards(Path(pairs))
    out_dir = Path(out_dir)
    scan = PairScan(cfg, shards, out_dir / QUARANTINE_FILE, image_workers() if workers is None else workers)
    scan.run()
    splits = {split: tally.summary() for split, tally in scan.tallies.items()}
    with tempfile.TemporaryDirectory(prefix="gx-") as root:
        gx_results = run_gx(cfg, {s: scan.gx_frame(s) for s, t in scan.tallies.items() if t.shards},
                            out_dir / DATA_DOCS_DIR, Path(root))
    for split, result in gx_results.items():
        splits[split]["gx_success"] = result["success"]
    overall = _overall(splits)
    failures = [f"validate: {f['shard']} ({f['split']}): {f['problem']}" for f in scan.failures]
    failures += table_failures(cfg, splits, overall, quarantine_shown or str(out_dir / QUARANTINE_FILE))
    return {"pairs": str(pairs), "success": not failures, "failures": failures, **overall, "splits": splits,
            "shard_failures": scan.failures, "quarantine_file": QUARANTINE_FILE,
            "quarantine_sample": _jsonable(scan.sample), "data_docs": f"{DATA_DOCS_DIR}/index.html",
            "expectations": scan.failures + [e for r in gx_results.values() for e in r["entries"]]}


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, float]:
    """report.json, report.html and metrics.json into `out_dir`; returns the metrics."""
    numbers = metrics(report)
    (out_dir / REPORT_FILE).write_text(json.dumps(_jsonable(report), indent=2, default=str) + "\n")
    (out_dir / HTML_FILE).write_text(_html(report))
    (out_dir / METRICS_FILE).write_text(json.dumps(numbers, indent=2, sort_keys=True) + "\n")
    return numbers


def _html(report: dict[str, Any]) -> str:
    """A self-contained page (the KFP HTML artifact, one file): verdict, counts per rule, the first
    quarantined rows and every expectation, with a link to the GX Data Docs beside it."""
    esc = html.escape

    def table(head: Sequence[str], rows: list[tuple[str, list[Any]]]) -> str:
        cells = "".join(f"<tr class={cls}>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                        for cls, row in rows)
        return "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + f"</tr>{cells}</table>"

    def details(entry: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in entry.items() if k not in ("success", "column", "expectation", "split")},
                          default=str)

    counts = table(["rule", "quarantined rows"], [("bad" if n else "ok", [r, n]) for r, n in report["counts"].items()])
    sample = table(["split", "shard", "row", "reasons", "detail"],
                   [("bad", [q["split"], q["shard"], q["row"], q["reasons"], q["detail"]])
                    for q in report["quarantine_sample"]])
    rules = table(["", "split", "column", "rule", "details"],
                  [("ok" if e["success"] else "bad", ["PASS" if e["success"] else "FAIL", e.get("split"), e["column"],
                                                      e["expectation"], details(e)]) for e in report["expectations"]])
    failures = "".join(f"<li>{esc(f)}</li>" for f in report["failures"])
    return ("<html><head><meta charset='utf-8'><title>pairs validation</title><style>"
            ".ok{background:#e6ffe6}.bad{background:#ffe6e6}td{padding:4px;font-family:monospace}</style></head>"
            f"<body><h1>{'PASSED' if report['success'] else 'FAILED'}: {esc(report['pairs'])}</h1><ul>{failures}</ul>"
            f"<p>{report['rows']} rows, {report['good_rows']} good, {report['quarantined']} quarantined "
            f"({_percent(report['bad_fraction'])}) in {esc(report['quarantine_file'])}; GX Data Docs: "
            f"<a href='{DATA_DOCS_DIR}/index.html'>{DATA_DOCS_DIR}/index.html</a></p>{counts}"
            f"<h2>quarantined rows (first {QUARANTINE_SAMPLE})</h2>{sample}<h2>expectations</h2>{rules}</body></html>")
