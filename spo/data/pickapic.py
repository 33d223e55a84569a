"""The Pick-a-Pic pair format (yuvalkirstain/pickapic_v1/v2), shared by the digits world and real data.

One row is one human (or oracle) judgement of two images for one caption. Labels: (1, 0) image 0
preferred, (0, 1) image 1 preferred, (0.5, 0.5) a tie. Images are JPEG bytes.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError

from spo.atomic_write import atomic_file

# Column names and dtypes of the real datasets (reference/mlops-stack.md §5); urls are not used here.
PICKAPIC_SCHEMA = pa.schema([
    ("are_different", pa.bool_()),
    ("best_image_uid", pa.string()),
    ("caption", pa.string()),
    ("created_at", pa.timestamp("ns")),
    ("has_label", pa.bool_()),
    ("image_0_uid", pa.string()),
    ("image_1_uid", pa.string()),
    ("jpg_0", pa.binary()),
    ("jpg_1", pa.binary()),
    ("label_0", pa.float64()),
    ("label_1", pa.float64()),
    ("model_0", pa.string()),
    ("model_1", pa.string()),
    ("num_example_per_prompt", pa.int64()),
    ("ranking_id", pa.int64()),
    ("user_id", pa.int64()),
])

REQUIRED_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
JPEG_QUALITY = 95


def encode_jpeg(image: torch.Tensor) -> bytes:
    """(3, H, W) in [-1, 1] -> JPEG bytes (quality 95, no chroma subsampling: tiny images stay crisp)."""
    pixels = ((image.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def decode_image(data: bytes, size: int, *, row: int | None = None, column: str = "jpg") -> torch.Tensor:
    """Image bytes -> (3, size, size) float32 in [-1, 1] (centre square crop, bicubic resize).

    Undecodable bytes raise ValueError naming the row and column.
    """
    try:
        image = Image.open(io.BytesIO(data))
        image = image.convert("RGB")
    except (UnidentifiedImageError, OSError, TypeError, ValueError) as err:
        where = f"row {row}, column {column!r}" if row is not None else f"column {column!r}"
        raise ValueError(f"undecodable image in {where}: {err}") from err
    width, height = image.size
    if width != height:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return pixels / 127.5 - 1


def decode_column(frame: pd.DataFrame, column: str, size: int) -> torch.Tensor:
    """Every image of one jpg column -> (N, 3, size, size); errors name the row (the frame's index)."""
    return torch.stack([decode_image(data, size, row=index, column=column)
                        for index, data in zip(frame.index, frame[column])])


def read_pairs(path: str | Path) -> pd.DataFrame:
    """Read a Pick-a-Pic parquet file; a missing file or required column is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file not found: {path}")
    try:
        frame = pd.read_parquet(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable parquet file: {err}") from err
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing required column(s) {missing} (has {list(frame.columns)})")
    return frame


def pickapic_table(frame: pd.DataFrame | pa.Table, where: str) -> pa.Table:
    """`frame` as an arrow table with exactly PICKAPIC_SCHEMA (the conversion `pickapic.write_pairs` does),
    other columns dropped; missing columns are an error naming `where`. No schema metadata is kept, so a
    shard's bytes depend only on its rows, whether they came from pandas or arrow."""
    names = frame.column_names if isinstance(frame, pa.Table) else list(frame.columns)
    missing = [name for name in PICKAPIC_SCHEMA.names if name not in names]
    if missing:
        raise ValueError(f"pairs frame for {where}: missing column(s) {missing}")
    if isinstance(frame, pa.Table):
        table = frame.select(PICKAPIC_SCHEMA.names).replace_schema_metadata(None).cast(PICKAPIC_SCHEMA)
    else:
        table = pa.Table.from_pandas(frame[PICKAPIC_SCHEMA.names], schema=PICKAPIC_SCHEMA, preserve_index=False)
    return table.replace_schema_metadata(None)


def write_pairs(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write `frame` atomically with exactly the Pick-a-Pic schema (missing columns are an error)."""
    table = pickapic_table(frame, str(path))
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp)
    return Path(path)
