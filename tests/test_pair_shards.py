"""PairShardWriter / PairShards: what is written reads back, row for row, by any access path."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from spo.data.pair_shards import PairShards, PairShardWriter
from spo.data.pickapic import PICKAPIC_SCHEMA, encode_jpeg
from spo.data.prepared_layout import shard_name, split_shards


def make_pairs(n: int, start: int = 0, seed: int = 0) -> pd.DataFrame:
    """n Pick-a-Pic rows with distinct tiny JPEGs; ranking_id = start + row, so rows are identifiable."""
    gen = torch.Generator().manual_seed(seed)
    labels = [(1.0, 0.0), (0.0, 1.0), (0.5, 0.5)]
    rows = []
    for i in range(start, start + n):
        label_0, label_1 = labels[i % 3]
        rows.append({
            "are_different": True, "best_image_uid": f"u{i}a", "caption": f"caption {i}",
            "created_at": pd.Timestamp("2023-01-01") + pd.Timedelta(seconds=i), "has_label": True,
            "image_0_uid": f"u{i}a", "image_1_uid": f"u{i}b",
            "jpg_0": encode_jpeg(torch.rand(3, 8, 8, generator=gen) * 2 - 1),
            "jpg_1": encode_jpeg(torch.rand(3, 8, 8, generator=gen) * 2 - 1),
            "label_0": label_0, "label_1": label_1, "model_0": "m0", "model_1": "m1",
            "num_example_per_prompt": 1 + i % 2, "ranking_id": i, "user_id": 7,
        })
    return pd.DataFrame(rows)


def write_split(pairs_dir, frames, rows_per_shard=10, row_group_size=4, split="train"):
    with PairShardWriter(pairs_dir, split, rows_per_shard, row_group_size=row_group_size) as writer:
        for frame in frames:
            writer.write(frame)
    return writer


@pytest.fixture(scope="module")
def source() -> pd.DataFrame:
    return make_pairs(27)


@pytest.fixture
def pairs_dir(tmp_path, source):
    write_split(tmp_path, [source.iloc[:5], source.iloc[5:18], source.iloc[18:]])
    return tmp_path


def test_writer_shards_schema_and_row_groups(pairs_dir, source):
    shards = split_shards(pairs_dir, "train")
    assert [p.name for p in shards] == [shard_name("train", i) for i in range(3)]
    assert [pq.read_metadata(p).num_rows for p in shards] == [10, 10, 7]
    groups = []
    for path in shards:
        assert pq.read_schema(path).remove_metadata() == PICKAPIC_SCHEMA
        meta = pq.read_metadata(path)
        groups.append([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
    assert groups == [[4, 4, 2], [4, 4, 2], [4, 3]]
    back = pd.concat([pd.read_parquet(p) for p in shards], ignore_index=True)
    pd.testing.assert_frame_equal(back, source[PICKAPIC_SCHEMA.names], check_dtype=False)
    assert not list(pairs_dir.glob(".*tmp*"))  # atomic writes leave no temp files


def test_writer_counts_and_empty_split(tmp_path, source):
    writer = write_split(tmp_path / "a", [source], rows_per_shard=9)
    assert (writer.rows_written, writer.shards_written) == (27, 3)
    empty = write_split(tmp_path / "b", [source.iloc[:0]], split="validation_unique")
    assert (empty.rows_written, empty.shards_written) == (0, 0)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_writer_discards_buffer_on_error(tmp_path, source):
    with pytest.raises(RuntimeError):
        with PairShardWriter(tmp_path, "train", 10) as writer:
            writer.write(source.iloc[:15])
            raise RuntimeError("boom")
    assert [p.name for p in split_shards(tmp_path, "train")] == ["train-00000.parquet"]


def test_writer_missing_column_is_an_error(tmp_path, source):
    with pytest.raises(ValueError, match="user_id"):
        write_split(tmp_path, [source.drop(columns=["user_id"])])


def test_rows_in_any_order_equal_source(pairs_dir, source):
    shards = PairShards(pairs_dir, "train")
    assert len(shards) == 27
    order = list(range(27))
    random.Random(0).shuffle(order)
    order += [3, 3, 26]  # repeats are allowed
    got = shards.rows(order)
    assert list(got.index) == order
    expected = source[PICKAPIC_SCHEMA.names].iloc[order].reset_index(drop=True)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), expected, check_dtype=False)
    assert shards.rows([]).empty


def test_small_cache_gives_the_same_rows(pairs_dir):
    order = list(range(27))
    random.Random(1).shuffle(order)
    big, small = PairShards(pairs_dir, "train"), PairShards(pairs_dir, "train", cache_groups=1)
    for chunk in (order[:9], order[9:], order):
        pd.testing.assert_frame_equal(big.rows(chunk), small.rows(chunk))
    pd.testing.assert_frame_equal(pickle.loads(pickle.dumps(small)).rows(order), big.rows(order))


def test_exclusion(pairs_dir, source):
    exclude = {"train-00000.parquet": {0, 9}, "train-00002.parquet": [6]}
    shards = PairShards(pairs_dir, "train", exclude=exclude)
    dropped = {0, 9, 26}  # global source rows of those (shard, row) pairs
    kept = [i for i in range(27) if i not in dropped]
    assert len(shards) == 24
    assert shards.row_ids[:2] == [("train-00000.parquet", 1), ("train-00000.parquet", 2)]
    assert shards.row_ids[-1] == ("train-00002.parquet", 5)
    assert shards.rows(range(24))["ranking_id"].tolist() == kept
    np.testing.assert_array_equal(shards.column("ranking_id"), kept)
    assert list(shards.column("caption")) == [f"caption {i}" for i in kept]


def test_row_groups_cover_every_row_once(pairs_dir):
    shards = PairShards(pairs_dir, "train", exclude={"train-00001.parquet": [4, 5, 6, 7]})  # one whole group
    groups = shards.row_groups()
    flat = [i for g in groups for i in g]
    assert sorted(flat) == list(range(len(shards))) and len(flat) == len(set(flat))
    # shards of 10 rows in groups of 4 -> groups of 4, 4, 2; the excluded group is gone
    assert [len(g) for g in groups] == [4, 4, 2, 4, 2, 4, 3]
    for group in groups:  # a group's rows share one shard and one parquet row group
        ids = [shards.row_ids[i] for i in group]
        assert len({name for name, _ in ids}) == 1 and len({row // 4 for _, row in ids}) == 1


def test_errors(tmp_path, pairs_dir, source):
    with pytest.raises(FileNotFoundError, match="validation_unique.*nowhere"):
        PairShards(tmp_path / "nowhere", "validation_unique")
    with pytest.raises(FileNotFoundError, match="'test'"):
        PairShards(pairs_dir, "test")
    with pytest.raises(ValueError, match="train-00009.parquet"):
        PairShards(pairs_dir, "train", exclude={"train-00009.parquet": [0]})
    with pytest.raises(ValueError, match="out of range"):
        PairShards(pairs_dir, "train", exclude={"train-00000.parquet": [10]})
    with pytest.raises(IndexError):
        PairShards(pairs_dir, "train").rows([27])
    with pytest.raises(KeyError, match="nope"):
        PairShards(pairs_dir, "train").column("nope")
    bad = tmp_path / "bad"
    bad.mkdir()
    source.drop(columns=["jpg_1"]).to_parquet(bad / "train-00000.parquet")
    with pytest.raises(ValueError, match=r"train-00000\.parquet.*jpg_1"):
        PairShards(bad, "train")


def test_arrow_and_pandas_input_write_the_same_bytes(tmp_path, source):
    import pyarrow as pa

    write_split(tmp_path / "pandas", [source])
    table = pa.Table.from_pandas(source.assign(extra=1))  # extra columns and pandas metadata are dropped
    write_split(tmp_path / "arrow", [table.slice(0, 13), table.slice(13)])
    for path in split_shards(tmp_path / "pandas", "train"):
        assert path.read_bytes() == (tmp_path / "arrow" / path.name).read_bytes()
