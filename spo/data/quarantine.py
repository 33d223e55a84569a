"""The rows `validate` set aside, and how later stages skip them.

`validate` writes `quarantine.parquet`: one row per bad pair, with where it came from (`shard`, `row`,
`split`), why (`reasons`, "; "-joined rule names, and `detail`) and all of its original columns, images
included, so a person can look at exactly what was rejected. The good rows are not copied anywhere:
training reads the prepared pairs and skips the rows named here (`quarantined_rows`), so a 200 GB dataset
is never written twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

QUARANTINE_FILE = "quarantine.parquet"
# Where a row came from and why it was set aside; the row's own columns follow these.
META_FIELDS = (pa.field("shard", pa.string()), pa.field("row", pa.int64()), pa.field("split", pa.string()),
               pa.field("reasons", pa.string()), pa.field("detail", pa.string()))
META_COLUMNS = tuple(f.name for f in META_FIELDS)
REASON_SEPARATOR = "; "


def quarantine_schema(rows: pa.Schema) -> pa.Schema:
    """The file's schema: the meta columns, then the rows' own columns (all nullable, so a column one
    shard lacks can be left empty; an original column named like a meta column is left out)."""
    own = [f.with_nullable(True) for f in rows.remove_metadata() if f.name not in META_COLUMNS]
    return pa.schema([*META_FIELDS, *own])


def quarantine_path(path: str | Path) -> Path:
    """`path` itself, or the quarantine file inside it when it is validate's output directory."""
    path = Path(path)
    return path / QUARANTINE_FILE if path.is_dir() else path


def _check(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"quarantine file not found: {path} (run the validate stage first)")
    missing = [c for c in META_COLUMNS if c not in pq.read_schema(path).names]
    if missing:
        raise ValueError(f"{path}: not a quarantine file, missing column(s) {missing}")
    return path


def read_quarantine(path: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """The quarantined rows (all columns, images included, unless `columns` says which)."""
    return pd.read_parquet(_check(quarantine_path(path)), columns=list(columns) if columns else None)


def quarantined_rows(path: str | Path, split: str) -> dict[str, set[int]]:
    """Shard file name -> the row indices (within that shard) to skip, for one split. Reads only the
    three small columns, so it is cheap however many images the file holds."""
    table = pq.read_table(_check(quarantine_path(path)), columns=["shard", "row", "split"],
                          filters=[("split", "=", split)])
    out: dict[str, set[int]] = {}
    for shard, row in zip(table.column("shard").to_pylist(), table.column("row").to_pylist()):
        out.setdefault(shard, set()).add(int(row))
    return out
