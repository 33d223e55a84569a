"""A local Pick-a-Pic v1 mirror: the hub repo's file layout and every column with its real dtype (DESIGN 2).

Real profiles read `prepare.data_dir` exactly as they would read a downloaded copy of
`yuvalkirstain/pickapic_v1`; this writes a few tiny shards of it, so CI runs that code path end to end.
Everything derives from `seed` (no clock, no random hashes): two builds give identical bytes.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from spo.atomic_write import atomic_file
from spo.data.pickapic import PICKAPIC_SCHEMA

TRAIN_SPLIT = "train"
EVAL_SPLIT = "validation_unique"
DATA_SUBDIR = "data"
IMAGE_URL = "https://text-to-image-human-preferences.s3.us-east-2.amazonaws.com/images/{uid}.png"
MODELS = ("CompVis/stable-diffusion-v1-4", "runwayml/stable-diffusion-v1-5", "stabilityai/stable-diffusion-2-1",
          "dreamlike-art/dreamlike-photoreal-2.0")
SUBJECTS = ("a red fox in the snow", "a lighthouse on a cliff at dusk", "a bowl of ramen with steam",
            "an astronaut riding a horse", "a cozy cabin in a pine forest", "a cat wearing a tiny crown",
            "a futuristic city skyline at night", "a vintage car on a desert road", "a dragon made of glass",
            "a field of sunflowers under a storm", "a portrait of an old sailor", "a koi pond in autumn")
STYLES = ("oil painting", "watercolor", "digital art, trending on artstation", "35mm photo", "studio ghibli style",
          "highly detailed, 4k", "pencil sketch", "low poly render")
BASE_TIME_NS = 1_680_000_000_000_000_000  # 2023-03-28, within Pick-a-Pic v1's collection period
JPEG_QUALITY = 90

_TYPES = {field.name: field.type for field in PICKAPIC_SCHEMA}
# Every Pick-a-Pic v1 column in the hub's order (reference/mlops-stack.md 5); types reused from PICKAPIC_SCHEMA.
PICKAPIC_MIRROR_COLUMNS = pa.schema([
    ("are_different", _TYPES["are_different"]),
    ("best_image_uid", _TYPES["best_image_uid"]),
    ("caption", _TYPES["caption"]),
    ("created_at", _TYPES["created_at"]),
    ("has_label", _TYPES["has_label"]),
    ("image_0_uid", _TYPES["image_0_uid"]),
    ("image_0_url", pa.string()),
    ("image_1_uid", _TYPES["image_1_uid"]),
    ("image_1_url", pa.string()),
    ("jpg_0", _TYPES["jpg_0"]),
    ("jpg_1", _TYPES["jpg_1"]),
    ("label_0", _TYPES["label_0"]),
    ("label_1", _TYPES["label_1"]),
    ("model_0", _TYPES["model_0"]),
    ("model_1", _TYPES["model_1"]),
    ("num_example_per_prompt", _TYPES["num_example_per_prompt"]),
    ("ranking_id", _TYPES["ranking_id"]),
    ("user_id", _TYPES["user_id"]),
    ("__index_level_0__", pa.int64()),
])


@dataclass(frozen=True)
class _Counters:
    """Where the next row's ids start, so ranking ids and index values are unique across the whole mirror."""

    ranking_id: int
    index: int


def fake_hash(*parts: object) -> str:
    """A fixed 16-hex "content hash" like the hub's shard names carry (c2396290184ff49d)."""
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:16]


def shard_name(split: str, index: int, count: int, seed: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}-{fake_hash(split, index, count, seed)}.parquet"


def _uid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(bytes=rng.bytes(16), version=4))


def _image(rng: np.random.Generator) -> bytes:
    """A colourful, varied JPEG (48-96 px, sometimes not square): a gradient with a few shapes on it."""
    width, height = (int(v) for v in rng.integers(6, 13, size=2) * 8)
    hue = rng.random()
    top = np.array(colorsys.hsv_to_rgb(hue, 0.8, 1.0)) * 255
    bottom = np.array(colorsys.hsv_to_rgb((hue + 0.4) % 1, 0.9, 0.5)) * 255
    ramp = np.linspace(0, 1, height)[:, None, None]
    pixels = np.broadcast_to(top * (1 - ramp) + bottom * ramp, (height, width, 3)).astype(np.uint8)
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        x1, y1 = x0 + int(rng.integers(8, width // 2 + 8)), y0 + int(rng.integers(8, height // 2 + 8))
        colour = tuple(int(c * 255) for c in colorsys.hsv_to_rgb(rng.random(), 1.0, 1.0))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _caption_plan(rng: np.random.Generator, train_rows: int, validation_rows: int
                  ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(caption, num_example_per_prompt) per train and per validation row. Train prompts repeat 1-3 times (users
    re-roll a prompt) and the count is the prompt's true count; validation_unique prompts are unique and unseen."""
    combos = [f"{subject}, {style}" for subject in SUBJECTS for style in STYLES]
    order = [combos[i] for i in rng.permutation(len(combos))]
    train: list[tuple[str, int]] = []
    while len(train) < train_rows:
        repeats = min(int(rng.integers(1, 4)), train_rows - len(train))
        train += [(order.pop(), repeats)] * repeats
    if validation_rows > len(order):
        raise ValueError(f"at most {len(order)} validation rows with distinct prompts; asked for {validation_rows}")
    return train, [(order.pop(), 1) for _ in range(validation_rows)]


def _labels(kind: str) -> tuple[float, float]:
    return {"first": (1.0, 0.0), "second": (0.0, 1.0), "tie": (0.5, 0.5)}[kind]


def _row_kinds(rng: np.random.Generator, n: int, *, with_oddities: bool) -> list[tuple[str, bool, bool]]:
    """(label kind, has_label, are_different) per row: mostly decided pairs, some ties, and (train only) the
    unlabelled and identical-image rows that real Pick-a-Pic train shards contain."""
    kinds = [("tie" if i % 5 == 2 else ("first" if rng.random() < 0.5 else "second"), True, True) for i in range(n)]
    if with_oddities and n >= 4:
        kinds[n - 1] = ("tie", False, True)
        kinds[n - 3] = ("tie", True, False)
    return kinds


def _table(rng: np.random.Generator, captions: list[tuple[str, int]], start: _Counters, *,
           with_oddities: bool) -> pa.Table:
    columns: dict[str, list] = {name: [] for name in PICKAPIC_MIRROR_COLUMNS.names}
    kinds = _row_kinds(rng, len(captions), with_oddities=with_oddities)
    for i, ((caption, repeats), (kind, has_label, different)) in enumerate(zip(captions, kinds)):
        uid_0, uid_1 = _uid(rng), _uid(rng)
        jpg_0 = _image(rng)
        jpg_1 = _image(rng) if different else jpg_0
        model_0 = MODELS[rng.integers(len(MODELS))]
        model_1 = MODELS[rng.integers(len(MODELS))] if different else model_0
        label_0, label_1 = _labels(kind)
        best = uid_0 if kind == "first" else uid_1 if kind == "second" else ""
        values = {
            "are_different": different, "best_image_uid": best, "caption": caption,
            "created_at": BASE_TIME_NS + int(rng.integers(0, 30 * 24 * 3600)) * 1_000_000_000,
            "has_label": has_label, "image_0_uid": uid_0, "image_0_url": IMAGE_URL.format(uid=uid_0),
            "image_1_uid": uid_1, "image_1_url": IMAGE_URL.format(uid=uid_1), "jpg_0": jpg_0, "jpg_1": jpg_1,
            "label_0": label_0, "label_1": label_1, "model_0": model_0, "model_1": model_1,
            "num_example_per_prompt": repeats, "ranking_id": start.ranking_id + i,
            "user_id": int(rng.integers(1, 50_000)), "__index_level_0__": start.index + i,
        }
        for name, value in values.items():
            columns[name].append(value)
    return pa.table(columns, schema=PICKAPIC_MIRROR_COLUMNS)


def _write(table: pa.Table, path: Path) -> None:
    with atomic_file(path) as tmp:
        pq.write_table(table, tmp, compression="snappy")


def build_pickapic_mirror(out_dir: Path, *, train_shards: int = 3, rows_per_shard: int = 12,
                          validation_rows: int = 8, seed: int = 0) -> Path:
    """Write `out_dir/data/{train-NNNNN-of-MMMMM,validation_unique-00000-of-00001}-<hash>.parquet`; return out_dir.

    Ranking ids are unique over the mirror (train ids first, like the hub's); `__index_level_0__` counts rows
    per split, as a pandas index pushed to the hub does.
    """
    out_dir = Path(out_dir)
    data = out_dir / DATA_SUBDIR
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ranking = 1_000 + int(rng.integers(0, 1_000))
    train, validation = _caption_plan(rng, train_shards * rows_per_shard, validation_rows)
    for shard in range(train_shards):
        rows = slice(shard * rows_per_shard, (shard + 1) * rows_per_shard)
        start = _Counters(ranking_id=ranking + rows.start, index=rows.start)
        _write(_table(rng, train[rows], start, with_oddities=True),
               data / shard_name(TRAIN_SPLIT, shard, train_shards, seed))
    start = _Counters(ranking_id=ranking + len(train), index=0)
    _write(_table(rng, validation, start, with_oddities=False), data / shard_name(EVAL_SPLIT, 0, 1, seed))
    return out_dir
