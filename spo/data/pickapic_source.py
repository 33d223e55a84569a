"""Reading Pick-a-Pic (yuvalkirstain/pickapic_v1 or _v2) for `prepare`: a local mirror or the hub, via `datasets`.

The source is `prepare.data_dir` (a local mirror in the hub layout, `data/{split}-NNNNN-of-MMMMM-<hash>.parquet`,
or those files flat in the dir) or else the hub repo (token from HF_TOKEN, read when a split is opened and never
logged or stored). Both are streamed through `datasets.load_dataset(..., streaming=True)` in file order, so a
run never needs the ~200 GB on disk twice and two runs read the same rows in the same order.

Rows keep exactly PICKAPIC_SCHEMA: the `image_*_url` and `__index_level_0__` columns are not kept (the images
are in jpg_0/jpg_1; the index is the hub's pandas index). Unlabelled rows (has_label False) are dropped and
counted; everything else is kept, ties and bad rows included: the `validate` stage quarantines undecodable
images, bad labels, duplicates and empty captions, with reasons, so nothing is dropped here silently.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spo.atomic_write import write_json
from spo.config import Config, ConfigError, MissingPathError, PrepareConfig
from spo.data import prepared_layout as layout
from spo.data.pair_shards import PairShardWriter
from spo.data.pickapic import PICKAPIC_SCHEMA, REQUIRED_COLUMNS
from spo.data.prompts import read_prompts
from spo.tracking.progress import progress

log = logging.getLogger(__name__)

HUB_REPOS = {"pickapic_v1": "yuvalkirstain/pickapic_v1", "pickapic_v2": "yuvalkirstain/pickapic_v2"}
SHIPPED_TRAIN_PROMPTS = "spo_4k_training_prompts.json"  # the 4,000 published SPO prompts, in spo/data/
MIRROR_SUBDIR = "data"
# the hub's shard names; the -<hash> suffix is optional (hand-made mirrors)
SHARD_FILE = re.compile(r"^(?P<split>[A-Za-z_]+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?:-[^/]*)?\.parquet$")
BATCH_ROWS = 256  # rows per arrow batch read: ~85 MB of Pick-a-Pic images
TRAIN, EVAL = layout.TRAIN_SPLIT, layout.EVAL_SPLIT


# ----------------------------------------------------------------------------------------------------
# where the files are (pure functions: testable offline)


def mirror_files(data_dir: Path) -> dict[str, list[Path]]:
    """split -> its shard files (sorted by shard number) in a local mirror: `data_dir/data/` (the hub layout)
    if it holds any shard file, else `data_dir` itself (files flat in the dir)."""
    nested = Path(data_dir) / MIRROR_SUBDIR
    for folder in (nested, Path(data_dir)):
        found: dict[str, list[Path]] = {}
        for path in sorted(folder.glob("*.parquet")) if folder.is_dir() else []:
            match = SHARD_FILE.match(path.name)
            if match:
                found.setdefault(match["split"], []).append(path)
        if found:
            return {split: sorted(paths, key=shard_number) for split, paths in found.items()}
    return {}


def shard_number(path: Path | str) -> int:
    """NNNNN of `{split}-NNNNN-of-MMMMM-*.parquet`."""
    match = SHARD_FILE.match(Path(path).name)
    if not match:
        raise ValueError(f"{path}: not a shard file name ({{split}}-NNNNN-of-MMMMM[-hash].parquet)")
    return int(match["index"])


def select_shards(files: Sequence[Path], shards: Sequence[int] | None, where: Path) -> list[Path]:
    """The files of the shard numbers `shards` (in the order given), or all files for None; numbers the mirror
    lacks are a ConfigError naming `prepare.shards`, the numbers and the dir."""
    if shards is None:
        return list(files)
    by_number = {shard_number(p): p for p in files}
    missing = [n for n in shards if n not in by_number]
    if missing:
        raise ConfigError(f"prepare.shards: train shard(s) {missing} are not in {where} "
                          f"(it has {sorted(by_number)[:10]}{'...' if len(by_number) > 10 else ''})")
    return [by_number[n] for n in dict.fromkeys(shards)]


def hub_data_files(split: str, shards: Sequence[int] | None = None) -> list[str]:
    """`data_files` patterns of one split in the hub repo: every shard, or the numbers in `shards`."""
    if shards is None:
        return [f"{MIRROR_SUBDIR}/{split}-*.parquet"]
    return [f"{MIRROR_SUBDIR}/{split}-{n:05d}-of-*.parquet" for n in dict.fromkeys(shards)]


def missing_columns(names: Sequence[str]) -> list[str]:
    """PICKAPIC_SCHEMA columns (the required ones first) absent from `names`."""
    wanted = [*REQUIRED_COLUMNS, *(c for c in PICKAPIC_SCHEMA.names if c not in REQUIRED_COLUMNS)]
    return [c for c in wanted if c not in names]


def check_mirror_file(path: Path) -> int:
    """A mirror shard's row count, from its footer; a file missing a column is a ConfigError naming both."""
    try:
        meta = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as err:
        raise ConfigError(f"prepare.data_dir: {path}: not a readable parquet file: {err}") from None
    missing = missing_columns(meta.schema.to_arrow_schema().names)
    if missing:
        raise ConfigError(f"prepare.data_dir: shard {path} is missing column(s) {missing}")
    return meta.num_rows


# ----------------------------------------------------------------------------------------------------
# the source


@dataclass(frozen=True)
class PickapicSource:
    """What to stream: local files (repo None) or hub `data_files` patterns of `repo`. No token in here."""

    where: str  # the dir or repo, for messages
    train: tuple[str, ...]
    validation: tuple[str, ...] | None  # None: the source has no validation_unique split
    repo: str | None = None
    train_rows: int | None = None  # known for a local mirror (footers), for the progress bar


def resolve_source(prepare: PrepareConfig) -> PickapicSource:
    """The mirror at `prepare.data_dir` (checked: files, shard numbers, columns), else the hub repo."""
    if prepare.data_dir is None:
        repo = HUB_REPOS[prepare.dataset]
        return PickapicSource(repo, tuple(hub_data_files(TRAIN, prepare.shards)), tuple(hub_data_files(EVAL)), repo)
    data_dir = Path(prepare.data_dir)
    if not data_dir.is_dir():
        raise MissingPathError(f"prepare.data_dir: directory not found: {data_dir}")
    files = mirror_files(data_dir)
    if not files.get(TRAIN):
        raise ConfigError(f"prepare.data_dir: no train shards ({TRAIN}-NNNNN-of-MMMMM-*.parquet) in {data_dir} "
                          f"or {data_dir / MIRROR_SUBDIR}")
    train = select_shards(files[TRAIN], prepare.shards, data_dir)
    validation = files.get(EVAL)
    rows = sum(check_mirror_file(p) for p in train)
    for path in validation or ():
        check_mirror_file(path)
    return PickapicSource(str(data_dir), tuple(map(str, train)),
                          tuple(map(str, validation)) if validation else None, None, rows)


def open_split(source: PickapicSource, split: str):
    """The split as a `datasets` IterableDataset (streaming, file order), or None if the source has no such
    split. The hub token is read here, from HF_TOKEN, and goes nowhere but `load_dataset`."""
    import datasets

    files = source.train if split == TRAIN else source.validation
    if not files:
        return None
    if source.repo is None:
        return datasets.load_dataset("parquet", data_files={split: list(files)}, split=split, streaming=True)
    try:
        return datasets.load_dataset(source.repo, data_files={split: list(files)}, split=split, streaming=True,
                                     token=os.environ.get("HF_TOKEN"))
    except FileNotFoundError as err:
        if isinstance(err, datasets.exceptions.DatasetNotFoundError):
            raise  # no such repo, or a gated one without HF_TOKEN: not a missing split
        if split == EVAL:  # no file matches the patterns
            return None
        raise ConfigError(f"prepare.shards: no train files {list(files)} in {source.repo}: {err}") from None


def stream_batches(stream, source: PickapicSource, split: str) -> Iterator[pa.Table]:
    """Arrow batches of an opened split with exactly PICKAPIC_SCHEMA (urls and the index dropped)."""
    for batch in stream.with_format("arrow").iter(batch_size=BATCH_ROWS):
        missing = missing_columns(batch.column_names)
        if missing:
            raise ConfigError(f"{source.where} ({split} split): missing column(s) {missing}")
        yield batch.select(PICKAPIC_SCHEMA.names).replace_schema_metadata(None).cast(PICKAPIC_SCHEMA)


def labelled(batch: pa.Table) -> pa.Table:
    """The rows with has_label True (a null has_label counts as unlabelled)."""
    return batch.filter(pc.fill_null(batch["has_label"], False))


def count_ties(batch: pa.Table) -> int:
    """Rows whose two labels are equal (0.5 / 0.5)."""
    return int(pc.sum(pc.fill_null(pc.equal(batch["label_0"], batch["label_1"]), False)).as_py() or 0)


# ----------------------------------------------------------------------------------------------------
# prepare


@dataclass
class _Counts:
    rows_read: int = 0
    unlabelled: int = 0
    kept: int = 0
    ties: int = 0


def write_train(source: PickapicSource, pairs_dir: Path, prepare: PrepareConfig) -> tuple[_Counts, int]:
    """Stream the train split into pairs/train-*.parquet until `prepare.max_pairs` kept rows; (counts, shards)."""
    counts = _Counts()
    bar = progress(desc="prepare: pick-a-pic", total=source.train_rows, unit="row")
    stream = open_split(source, TRAIN)
    with bar, PairShardWriter(pairs_dir, TRAIN, prepare.rows_per_shard) as writer:
        for batch in stream_batches(stream, source, TRAIN):
            batch = _up_to_max(batch, prepare.max_pairs, counts.kept)
            kept = labelled(batch)
            counts.rows_read += batch.num_rows
            counts.unlabelled += batch.num_rows - kept.num_rows
            counts.kept += kept.num_rows
            counts.ties += count_ties(kept)
            writer.write(kept)
            bar.update(batch.num_rows)
            bar.set_postfix(kept=counts.kept, ties=counts.ties)
            if prepare.max_pairs is not None and counts.kept >= prepare.max_pairs:
                break
    return counts, writer.shards_written


def _up_to_max(batch: pa.Table, max_pairs: int | None, kept_so_far: int) -> pa.Table:
    """The head of `batch` that ends at the row giving `max_pairs` kept rows (all of it if it doesn't get
    there), so rows_read counts only rows actually used."""
    if max_pairs is None:
        return batch
    flags = pc.fill_null(batch["has_label"], False).to_pylist()
    need = max_pairs - kept_so_far
    for position, flag in enumerate(flags):
        need -= bool(flag)
        if need <= 0:
            return batch.slice(0, position + 1)
    return batch


def write_validation(source: PickapicSource, pairs_dir: Path, prepare: PrepareConfig
                     ) -> tuple[int, list[dict]] | None:
    """validation_unique's labelled rows (as the published SPM evaluates on) into pairs/validation_unique-*;
    (rows written, eval prompts from their unique captions), or None if the source has no such split."""
    stream = open_split(source, EVAL)
    if stream is None:
        log.warning("%s has no %s split: no held-out pairs written", source.where, EVAL)
        return None
    prompts: dict[str, int] = {}
    with PairShardWriter(pairs_dir, EVAL, prepare.rows_per_shard) as writer:
        for batch in stream_batches(stream, source, EVAL):
            kept = labelled(batch)
            for offset, caption in enumerate(kept["caption"].to_pylist()):
                if caption is not None and caption.strip():  # a blank caption is no prompt (validate flags it)
                    prompts.setdefault(caption, writer.rows_written + writer.buffered + offset)
            writer.write(kept)
    return writer.rows_written, [{"caption": c, "trainset_idx": i} for c, i in prompts.items()]


def shipped_train_prompts() -> Path:
    """The 4,000 SPO training prompts shipped in the package (spo/data/spo_4k_training_prompts.json)."""
    path = Path(str(resources.files("spo.data").joinpath(SHIPPED_TRAIN_PROMPTS)))
    if not path.is_file():
        raise FileNotFoundError(f"the shipped SPO prompts are missing from the installed package: {path}")
    return path


def prompt_file(value: str | None, key: str) -> Path | None:
    """A prompt file the config names, checked (exists, SPO format); None if the key is null."""
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise MissingPathError(f"{key}: prompt file not found: {path}")
    try:
        read_prompts(path)
    except (ValueError, json.JSONDecodeError) as err:
        raise ConfigError(f"{key}: {err}") from None
    return path


def models_manifest(cfg: Config) -> dict[str, str | None]:
    """Where each model of the run comes from (hub ids on a cluster), recorded beside the data."""
    model = cfg.model
    return {"architecture": model.architecture, "base_model": model.base_model, "vae": model.vae,
            "preference_backbone": model.preference_backbone, "preference_processor": model.preference_processor}


def _no_eval_prompts(source: PickapicSource) -> ConfigError:
    return ConfigError(f"prepare.eval_prompts: null, and {source.where} has no labelled {EVAL} rows to take "
                       "eval prompts from; set prepare.eval_prompts to an SPO prompt file")


def prepare_pickapic(cfg: Config, staging: Path) -> dict[str, float]:
    """Write the prepared layout (spo.data.prepared_layout) for a Pick-a-Pic profile into `staging`;
    return its metrics. Config errors come before any row is read."""
    start = time.perf_counter()
    prepare = cfg.prepare
    source = resolve_source(prepare)
    train_prompts = prompt_file(prepare.train_prompts, "prepare.train_prompts") or shipped_train_prompts()
    eval_prompts = prompt_file(prepare.eval_prompts, "prepare.eval_prompts")
    if eval_prompts is None and source.validation is None:
        raise _no_eval_prompts(source)
    pairs_dir = staging / layout.PAIRS_DIR
    pairs_dir.mkdir(parents=True)
    validation = write_validation(source, pairs_dir, prepare)
    if eval_prompts is None and not (validation and validation[1]):
        raise _no_eval_prompts(source)
    counts, train_shards = write_train(source, pairs_dir, prepare)
    if not counts.kept:
        raise ConfigError(f"{source.where}: no labelled train rows in {counts.rows_read} rows read")
    (staging / layout.TRAIN_PROMPTS_FILE).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(train_prompts, staging / layout.TRAIN_PROMPTS_FILE)
    if eval_prompts is not None:
        shutil.copyfile(eval_prompts, staging / layout.EVAL_PROMPTS_FILE)
    else:
        write_json(staging / layout.EVAL_PROMPTS_FILE, validation[1])
    write_json(staging / layout.MODELS_MANIFEST, models_manifest(cfg))
    return {"rows_read": counts.rows_read, "unlabelled": counts.unlabelled, "kept": counts.kept,
            "ties": counts.ties, "eval_rows": validation[0] if validation else 0, "train_shards": train_shards,
            "train_prompts": len(read_prompts(staging / layout.TRAIN_PROMPTS_FILE)),
            "eval_prompts": len(read_prompts(staging / layout.EVAL_PROMPTS_FILE)),
            "seconds": round(time.perf_counter() - start, 3)}
