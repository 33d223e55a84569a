"""Pick-a-Pic pairs in shards (layout: spo.data.prepared_layout): a streaming writer and a random-access reader.

Real splits are far bigger than memory (Pick-a-Pic v1 train is ~200 GB of JPEG bytes), so `prepare` writes
them shard by shard, and training reads single rows by global index without loading any image up front:
the reader's index comes from parquet footers only, and rows are read one row group at a time (small row
groups keep a random read cheap), behind a small LRU cache of row groups.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spo.atomic_write import atomic_file
from spo.data.pickapic import REQUIRED_COLUMNS, pickapic_table
from spo.data.prepared_layout import shard_name, split_shards

DEFAULT_ROW_GROUP_SIZE = 64
DEFAULT_CACHE_GROUPS = 64


class PairShardWriter:
    """Writes one split as `pairs_dir/{split}-NNNNN.parquet` shards of `rows_per_shard` rows (the last may be
    shorter), each atomically, so a reader never sees a half-written shard. Use as a context manager: a clean
    exit flushes the last partial shard; an exception discards the buffered rows (shards already written stay,
    the stage's `atomic_dir` removes them)."""

    def __init__(self, pairs_dir: Path, split: str, rows_per_shard: int,
                 row_group_size: int = DEFAULT_ROW_GROUP_SIZE) -> None:
        if rows_per_shard < 1 or row_group_size < 1:
            raise ValueError(f"rows_per_shard ({rows_per_shard}) and row_group_size ({row_group_size}) must be >= 1")
        self.pairs_dir = Path(pairs_dir)
        self.split = split
        self.rows_per_shard = rows_per_shard
        self.row_group_size = row_group_size
        self.rows_written = 0
        self.shards_written = 0
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._closed = False

    def __enter__(self) -> PairShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if kind is None:
            self.close()
        else:
            self._buffer, self._buffered, self._closed = [], 0, True

    def write(self, frame: pd.DataFrame | pa.Table) -> None:
        """Buffer `frame`'s rows (all PICKAPIC_SCHEMA columns needed, others dropped); write every full shard.
        An arrow table skips the pandas round trip of the image bytes."""
        if self._closed:
            raise ValueError(f"PairShardWriter({self.pairs_dir}, {self.split!r}) is closed")
        if len(frame) == 0:
            return
        self._buffer.append(pickapic_table(frame, f"{self.pairs_dir}/{self.split}"))
        self._buffered += len(frame)
        while self._buffered >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    @property
    def buffered(self) -> int:
        """Rows written to the writer but not yet to a shard: rows_written + buffered is the next row's index."""
        return self._buffered

    def close(self) -> None:
        """Write the last partial shard (none if the split is empty)."""
        if self._closed:
            return
        if self._buffered:
            self._flush(self._buffered)
        self._closed = True

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self._buffer)
        shard, rest = table.slice(0, rows), table.slice(rows)
        self._buffer, self._buffered = ([rest] if rest.num_rows else []), rest.num_rows
        path = self.pairs_dir / shard_name(self.split, self.shards_written)
        with atomic_file(path) as tmp:
            pq.write_table(shard.combine_chunks(), tmp, row_group_size=self.row_group_size)
        self.shards_written += 1
        self.rows_written += rows


class PairShards:
    """Read-only random access over one split's shards, by global row index (0..len-1, quarantined rows left
    out). `exclude` maps a shard file name (`train-00003.parquet`) to row numbers within it to skip.

    Picklable (open files and the cache are dropped), so DataLoader workers can each hold one.
    """

    def __init__(self, pairs_dir: Path, split: str, exclude: Mapping[str, Collection[int]] | None = None,
                 *, cache_groups: int = DEFAULT_CACHE_GROUPS) -> None:
        self.pairs_dir = Path(pairs_dir)
        self.split = split
        self.cache_groups = max(1, cache_groups)
        self.paths = split_shards(self.pairs_dir, split) if self.pairs_dir.is_dir() else []
        if not self.paths:
            raise FileNotFoundError(f"no {split!r} pair shards ({split}-NNNNN.parquet) in {self.pairs_dir}")
        self._build_index(exclude or {})
        self._files: dict[int, pq.ParquetFile] = {}
        self._cache: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    # -- index ------------------------------------------------------------------------------------------

    def _build_index(self, exclude: Mapping[str, Collection[int]]) -> None:
        """Per kept row: its shard, row group, offset in the group and row in the shard (footers only)."""
        names = [p.name for p in self.paths]
        unknown = sorted(set(exclude) - set(names))
        if unknown:
            raise ValueError(f"exclude names shard(s) {unknown} that are not {self.split!r} shards in {self.pairs_dir}")
        shard, group, offset, row = [], [], [], []
        self.shard_rows: list[int] = []
        for index, path in enumerate(self.paths):
            meta = pq.read_metadata(path)
            _check_columns(path, meta.schema.to_arrow_schema().names)
            sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            total = sum(sizes)
            self.shard_rows.append(total)
            skip = np.asarray(sorted(exclude.get(path.name, ())), dtype=np.int64)
            if skip.size and (skip.min() < 0 or skip.max() >= total):
                raise ValueError(f"exclude[{path.name!r}]: row numbers out of range 0..{total - 1}: "
                                 f"{[int(r) for r in skip if r < 0 or r >= total][:5]}")
            rows = np.arange(total, dtype=np.int64)
            groups = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
            starts = np.repeat(np.cumsum([0, *sizes[:-1]]).astype(np.int64), sizes)
            keep = ~np.isin(rows, skip)
            shard.append(np.full(int(keep.sum()), index, dtype=np.int64))
            group.append(groups[keep])
            offset.append((rows - starts)[keep])
            row.append(rows[keep])
        self._shard, self._group = np.concatenate(shard), np.concatenate(group)
        self._offset, self._row = np.concatenate(offset), np.concatenate(row)

    def __len__(self) -> int:
        return len(self._shard)

    @property
    def row_ids(self) -> list[tuple[str, int]]:
        """(shard file name, row in shard) of each global index: what the quarantine and reports name."""
        names = [p.name for p in self.paths]
        return [(names[s], int(r)) for s, r in zip(self._shard, self._row)]

    def row_groups(self) -> list[list[int]]:
        """Global indices grouped by parquet row group (in file order), for locality-aware shuffling:
        shuffle the groups, then rows within a few groups, and each read hits the cache."""
        if not len(self):
            return []
        key = self._shard * (int(self._group.max()) + 1) + self._group  # non-decreasing: rows are in file order
        bounds = np.flatnonzero(np.diff(key)) + 1
        return [part.tolist() for part in np.split(np.arange(len(self), dtype=np.int64), bounds)]

    # -- reading ----------------------------------------------------------------------------------------

    def column(self, name: str) -> np.ndarray:
        """One column over all kept rows, reading only that column (captions, labels: no image bytes)."""
        parts = []
        for index, path in enumerate(self.paths):
            file = self._file(index)
            if name not in file.schema_arrow.names:
                raise KeyError(f"{path.name}: no column {name!r} (has {file.schema_arrow.names})")
            parts.append(file.read(columns=[name]).column(0))
        values = pa.chunked_array([c for p in parts for c in p.chunks], type=parts[0].type)
        starts = np.cumsum([0, *self.shard_rows[:-1]]).astype(np.int64)
        return values.take(pa.array(starts[self._shard] + self._row)).to_numpy(zero_copy_only=False)

    def rows(self, indices: Sequence[int]) -> pd.DataFrame:
        """The rows at these global indices, in this order, all columns; the frame's index is the global
        indices (so decode errors name a row the caller can find again)."""
        wanted = np.asarray(indices, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
            bad = [int(i) for i in wanted if i < 0 or i >= len(self)][:5]
            raise IndexError(f"{self.split} pairs: indices {bad} out of range 0..{len(self) - 1}")
        if not wanted.size:
            empty = self._file(0).schema_arrow.empty_table().to_pandas()
            return empty.set_axis(pd.Index([], name="row", dtype="int64"))
        by_group: dict[tuple[int, int], list[int]] = {}  # each row group once, in first-requested order
        for position, key in enumerate(zip(self._shard[wanted].tolist(), self._group[wanted].tolist())):
            by_group.setdefault(key, []).append(position)
        pieces, order = [], []
        for key, positions in by_group.items():
            pieces.append(self._row_group(*key).take(pa.array(self._offset[wanted[positions]])))
            order.extend(positions)
        table = pa.concat_tables(pieces, promote_options="permissive")
        table = table.take(pa.array(np.argsort(np.asarray(order), kind="stable")))
        return table.to_pandas().set_axis(pd.Index(wanted, name="row"))

    def _file(self, index: int) -> pq.ParquetFile:
        if index not in self._files:
            self._files[index] = pq.ParquetFile(self.paths[index])
        return self._files[index]

    def _row_group(self, shard: int, group: int) -> pa.Table:
        key = (shard, group)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        table = self._file(shard).read_row_group(group)
        self._cache[key] = table
        while len(self._cache) > self.cache_groups:
            self._cache.popitem(last=False)
        return table

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_cache"] = {}, OrderedDict()
        return state


def _check_columns(path: Path, names: Sequence[str]) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: shard is missing required column(s) {missing} (has {list(names)})")
