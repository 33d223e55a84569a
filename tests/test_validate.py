"""The pairs validation: every row checked, bad rows quarantined with their shard, row and reasons; bad
tables (a missing column, too many bad rows, too few good ones) fail with a message naming the rule."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import REPO_ROOT, good_pairs_frame
from mlflow import MlflowClient

from spo.config import load_profile
from spo.data import pair_validation
from spo.data.pickapic import PICKAPIC_SCHEMA, write_pairs
from spo.data.quarantine import META_COLUMNS, quarantined_rows, read_quarantine
from spo.stages import validate
from spo.stages.validate import DataValidationError
from spo.tracking.tracker import MemoryTracker

CFG = load_profile("digits", ["validate.min_rows=10", "validate.max_tie_fraction=0.5"])
MAX_CAPTION = CFG.validate.max_caption_length
CORRUPT_JPEG = b"\xff\xd8\xff not really a jpeg"


def truncated(jpeg: bytes) -> bytes:
    """A JPEG whose header opens but whose data stops soon after its start-of-scan marker: only a full
    decode finds it."""
    return jpeg[: jpeg.index(b"\xff\xda") + 20]


def write_shards(pairs_dir, frame, sizes, split="train", row_group_size=None):
    """`frame` cut into shards of `sizes` rows, named as `prepare` names them."""
    pairs_dir.mkdir(parents=True, exist_ok=True)
    start = 0
    for index, size in enumerate(sizes):
        path = pairs_dir / f"{split}-{index:05d}.parquet"
        part = frame.iloc[start:start + size]
        if row_group_size is None:
            write_pairs(part, path)
        else:  # several row groups in one shard
            table = pa.Table.from_pandas(part[PICKAPIC_SCHEMA.names], schema=PICKAPIC_SCHEMA, preserve_index=False)
            pq.write_table(table, path, row_group_size=row_group_size)
        start += size
    return pairs_dir


def run_validate(pairs, out_dir, cfg=CFG, tracker=None, workers=0):
    return validate.run(cfg, pairs_dir=pairs, out_dir=out_dir, tracker=tracker or MemoryTracker(), workers=workers)


def run_failing(pairs, out_dir, cfg=CFG, workers=0):
    """(error message, report.json): the outputs are written even though the stage fails."""
    with pytest.raises(DataValidationError) as err:
        run_validate(pairs, out_dir, cfg, workers=workers)
    report = json.loads((out_dir / "report.json").read_text())
    assert report["success"] is False and report["failures"] == str(err.value).splitlines()
    return str(err.value), report


def reasons_by_row(out_dir):
    q = read_quarantine(out_dir, columns=["shard", "row", "reasons"])
    return {(s, r): set(reasons.split("; ")) for s, r, reasons in zip(q["shard"], q["row"], q["reasons"])}


# ----------------------------------------------------------------------------------------------------
# 1,000 rows over two shards


FAULTS = {  # global row -> (rules it breaks); shard 0 holds rows 0-499, shard 1 rows 500-999
    5: {"image_undecodable"}, 500: {"image_undecodable"},
    10: {"label_nan"}, 11: {"label_nan"}, 12: {"label_nan"},
    20: {"label_invalid"}, 30: {"label_sum"}, 31: {"label_invalid", "label_sum"},
    40: {"caption_empty"}, 41: {"caption_empty"}, 42: {"caption_empty"},
    50: {"caption_too_long"},
    60: {"duplicate_id"}, 700: {"duplicate_id"},
    70: {"label_sum", "caption_empty"},
}


def located(row):
    return (f"train-{row // 500:05d}.parquet", row % 500)


@pytest.fixture(scope="module")
def images_frame():
    """1,000 good rows but for corrupt JPEGs at rows 5 (unreadable) and 500 (truncated)."""
    frame = good_pairs_frame(1000)
    frame.at[5, "jpg_0"] = CORRUPT_JPEG
    frame.at[500, "jpg_1"] = truncated(frame.at[500, "jpg_1"])
    return frame


@pytest.fixture(scope="module")
def faulty_frame(images_frame):
    """FAULTS: every row rule broken somewhere, 15 of 1,000 rows (1.5%, over the 1% limit)."""
    frame = images_frame.copy()
    frame.loc[10, "label_0"] = np.nan
    frame.loc[11, "label_1"] = np.inf
    frame.loc[12, "label_1"] = None
    frame.loc[20, ["label_0", "label_1"]] = [0.3, 0.7]  # sums to 1: only the value set is broken
    frame.loc[30, ["label_0", "label_1"]] = [1.0, 1.0]
    frame.loc[31, ["label_0", "label_1"]] = [0.3, 0.3]
    frame.loc[[40, 41, 42], "caption"] = ["", "   ", None]
    frame.loc[50, "caption"] = "x" * (MAX_CAPTION + 1)
    frame.loc[51, "caption"] = "x" * MAX_CAPTION  # at the limit: fine
    frame.loc[60, "ranking_id"] = frame.loc[3, "ranking_id"]  # same shard
    frame.loc[700, "ranking_id"] = frame.loc[4, "ranking_id"]  # across shards of one split
    frame.loc[70, ["label_0", "label_1", "caption"]] = [0.0, 0.0, ""]
    return frame


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, images_frame):
    """Only the two corrupt JPEGs (0.2%): passes; decoded in the worker pool."""
    root = tmp_path_factory.mktemp("clean")
    pairs = write_shards(root / "pairs", images_frame, [500, 500])
    tracker = MemoryTracker()
    summary = run_validate(pairs, root / "out", tracker=tracker, workers=None)
    return root / "out", summary, tracker


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory, faulty_frame):
    """FAULTS, shard 1 in row groups of 64 rows: fails (over max_bad_fraction), outputs written."""
    root = tmp_path_factory.mktemp("faulty")
    pairs = root / "pairs"
    write_shards(pairs, faulty_frame.iloc[:500], [500])
    write_shards(pairs / "tmp", faulty_frame.iloc[500:], [500], row_group_size=64)
    (pairs / "tmp" / "train-00000.parquet").rename(pairs / "train-00001.parquet")
    (pairs / "tmp").rmdir()
    message, report = run_failing(pairs, root / "out", workers=None)
    return root / "out", message, report


def test_every_row_is_decoded_and_the_corrupt_ones_quarantined(clean_run, images_frame):
    out, summary, _ = clean_run
    assert reasons_by_row(out) == {located(5): {"image_undecodable"}, located(500): {"image_undecodable"}}
    q = read_quarantine(out).set_index("row")
    assert q.loc[5, "detail"].startswith("jpg_0: UnidentifiedImageError") and q.loc[0, "detail"].startswith("jpg_1: ")
    assert q.loc[5, "jpg_0"] == CORRUPT_JPEG and q.loc[0, "jpg_0"] == images_frame.at[500, "jpg_0"]  # all columns
    assert list(read_quarantine(out).columns[:5]) == list(META_COLUMNS) and set(q["split"]) == {"train"}
    assert summary["rows"] == 1000 and summary["good_rows"] == 998 and summary["bad_fraction"] == 0.002
    assert summary["quarantined_image_undecodable"] == 2 and summary["quarantined_label_sum"] == 0


def test_passing_run_writes_every_output_and_logs_it(clean_run):
    out, summary, tracker = clean_run
    report = json.loads((out / "report.json").read_text())
    assert report["success"] and report["failures"] == [] and report["splits"]["train"]["gx_success"]
    assert json.loads((out / "metrics.json").read_text()) == summary
    assert {f"quarantined_{rule}" for rule in pair_validation.RULES} | {"duplicates", "train_rows"} <= set(summary)
    assert tracker.last("quarantined") == 2.0 and tracker.last("train_bad_fraction") == 0.002
    assert "PASSED" in (out / "report.html").read_text() and "train-00001.parquet" in (out / "report.html").read_text()
    assert (out / "data_docs" / "index.html").is_file() and list((out / "data_docs" / "validations").rglob("*.html"))
    assert (str(out / "data_docs"), "validate/data_docs") in tracker.artifacts


def test_each_rule_quarantines_exactly_its_rows(faulty_run):
    out, _, report = faulty_run
    assert reasons_by_row(out) == {located(row): rules for row, rules in FAULTS.items()}
    expected = {rule: sum(rule in rules for rules in FAULTS.values()) for rule in pair_validation.RULES}
    assert report["counts"] == expected and report["quarantined"] == len(FAULTS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert {rule: metrics[f"quarantined_{rule}"] for rule in pair_validation.RULES} == expected
    assert metrics["duplicates"] == 2 and metrics["good_rows"] == 1000 - len(FAULTS)
    details = dict(zip(read_quarantine(out)["row"], read_quarantine(out)["detail"]))
    assert "id first seen at train-00000.parquet row 4" in details[200]  # row 700 = shard 1, row 200
    assert "labels (null, 0.5)" in details[10] and f"{MAX_CAPTION + 1} characters" in details[50]


def test_too_many_bad_rows_fail_naming_each_rule_and_count(faulty_run):
    out, message, _ = faulty_run
    assert message == (
        f"validate: 15 of 1000 rows (1.5%) quarantined, over validate.max_bad_fraction=0.01: image_undecodable 2, "
        f"label_nan 3, label_invalid 2, label_sum 3, caption_empty 4, caption_too_long 1, duplicate_id 2; "
        f"see {out / 'quarantine.parquet'}")
    assert "FAILED" in (out / "report.html").read_text()


def test_gx_counts_and_verdict_agree_with_the_quarantine(faulty_run, clean_run):
    out, _, report = faulty_run
    q = reasons_by_row(out)
    gx = {e["rule"]: e for e in report["expectations"] if e.get("rule")}
    for rule in pair_validation.RULES:
        assert gx[rule]["unexpected_count"] == sum(rule in r for r in q.values()), rule
        assert gx[rule]["mostly"] == pytest.approx(1 - CFG.validate.max_bad_fraction)
    label_rules = {"label_nan", "label_invalid", "label_sum"}
    assert gx["labels"]["unexpected_count"] == sum(bool(r & label_rules) for r in q.values())  # GX on raw labels
    assert gx["quarantined"]["unexpected_count"] == len(q) and not gx["quarantined"]["success"]
    examples = gx["image_undecodable"]["unexpected_examples"]
    assert {(x["shard"], x["row"]) for x in examples} == {located(5), located(500)}
    assert report["splits"]["train"]["gx_success"] is False  # the stage failed: so did GX
    assert json.loads((clean_run[0] / "report.json").read_text())["splits"]["train"]["gx_success"] is True


def test_quarantined_rows_round_trip(faulty_run):
    out, _, _ = faulty_run
    rows = quarantined_rows(out / "quarantine.parquet", "train")
    expected: dict[str, set[int]] = {}
    for row in FAULTS:
        expected.setdefault(located(row)[0], set()).add(located(row)[1])
    assert rows == expected and quarantined_rows(out, "validation_unique") == {}


def test_under_the_limit_passes(faulty_run, tmp_path):
    """The same 15 bad rows pass with a 2% limit; they are still quarantined."""
    pairs = faulty_run[0].parent / "pairs"
    cfg = load_profile("digits", ["validate.min_rows=10", "validate.max_bad_fraction=0.02"])
    assert run_validate(pairs, tmp_path / "out", cfg)["quarantined"] == len(FAULTS)
    assert len(read_quarantine(tmp_path / "out", columns=["row"])) == len(FAULTS)


# ----------------------------------------------------------------------------------------------------
# splits, ids, tables


def test_ids_repeat_only_within_a_split(tmp_path):
    """Without ranking_id the id is (image_0_uid, image_1_uid); the first occurrence is kept. Each split is
    judged on its own: 1 of 20 eval rows (5%) is over a 4% limit though the whole (2 of 60) is not."""
    train, evaluation = good_pairs_frame(40), good_pairs_frame(20)  # the same uids in both splits: fine
    train.loc[3, ["image_0_uid", "image_1_uid"]] = train.loc[1, ["image_0_uid", "image_1_uid"]].to_numpy()
    evaluation.loc[19, ["image_0_uid", "image_1_uid"]] = evaluation.loc[0, ["image_0_uid", "image_1_uid"]].to_numpy()
    pairs = tmp_path / "pairs"
    for frame, split in ((train, "train"), (evaluation, "validation_unique")):
        pairs.mkdir(exist_ok=True)
        frame.drop(columns=["ranking_id"]).to_parquet(pairs / f"{split}-00000.parquet", index=False)
    cfg = load_profile("digits", ["validate.min_rows=10", "validate.max_bad_fraction=0.04"])
    message, report = run_failing(pairs, tmp_path / "out", cfg, workers=2)
    assert message.startswith("validate: split validation_unique: 1 of 20 rows (5%) quarantined, over "
                              "validate.max_bad_fraction=0.04: duplicate_id 1; see ")
    assert quarantined_rows(tmp_path / "out", "train") == {"train-00000.parquet": {3}}
    assert quarantined_rows(tmp_path / "out", "validation_unique") == {"validation_unique-00000.parquet": {19}}
    assert report["splits"]["train"]["quarantined"] == 1 and report["quarantined"] == 2
    first = (tmp_path / "out" / "quarantine.parquet").read_bytes()
    with pytest.raises(DataValidationError):
        run_validate(pairs, tmp_path / "again", cfg, workers=0)
    assert (tmp_path / "again" / "quarantine.parquet").read_bytes() == first  # same bytes, any worker count


def test_missing_or_mistyped_column_fails_its_shard_by_name(tmp_path):
    good = good_pairs_frame(24)
    pairs = write_shards(tmp_path / "pairs", good, [24])
    good.drop(columns=["label_1"]).to_parquet(pairs / "train-00001.parquet", index=False)
    wrong = good.copy()
    wrong["label_0"] = wrong["label_0"].astype(str)
    wrong.to_parquet(pairs / "train-00002.parquet", index=False)
    message, report = run_failing(pairs, tmp_path / "out")
    missing, mistyped = message.splitlines()
    assert missing == "validate: train-00001.parquet (train): missing required column 'label_1'"
    assert mistyped.startswith("validate: train-00002.parquet (train): column 'label_0' has type ")
    assert mistyped.endswith("string, expected float")  # pandas writes large_string
    assert report["rows"] == 24 and report["splits"]["train"]["shards"] == ["train-00000.parquet"]
    assert read_quarantine(tmp_path / "out").empty  # nothing to quarantine row by row


def test_too_few_good_rows_and_too_many_ties(tmp_path):
    frame = good_pairs_frame(8)
    frame[["label_0", "label_1"]] = 0.5
    message, report = run_failing(write_shards(tmp_path / "pairs", frame, [8]), tmp_path / "out")
    assert message.splitlines() == [
        "validate: split train has 8 good rows, under validate.min_rows=10",
        "validate: split train: 100% of good rows are ties, over validate.max_tie_fraction=0.5"]
    failed = {e["rule"] for e in report["expectations"] if not e["success"]}
    assert failed == {"min_rows", "max_tie_fraction"}  # GX says the same
    assert len(read_quarantine(tmp_path / "out")) == 0  # written, empty, with the same columns
    assert list(read_quarantine(tmp_path / "out").columns[:5]) == list(META_COLUMNS)


def test_digits_pairs_pass_with_nothing_quarantined(tmp_path):
    """The digits world's own pair format (spo.digits.pairs.pairs_frame), one shard as `prepare` writes it."""
    import torch

    from spo.data.pickapic import encode_jpeg
    from spo.digits.captions import train_captions
    from spo.digits.pairs import pairs_frame

    n = 120
    images = [encode_jpeg(torch.rand(3, 16, 16) * 2 - 1) for _ in range(2 * n)]
    captions = [train_captions()[i % len(train_captions())] for i in range(n)]
    frame = pairs_frame(captions, images[:n], images[n:], torch.tensor([1.0, 0.0, 0.5] * (n // 3)))
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    write_pairs(frame, pairs / "train-00000.parquet")
    summary = run_validate(pairs, tmp_path / "out", load_profile("digits"))
    assert summary["quarantined"] == 0 and summary["good_rows"] == n


def test_single_parquet_file_is_the_train_split(tmp_path):
    path = write_pairs(good_pairs_frame(), tmp_path / "pairs.parquet")
    assert run_validate(path, tmp_path / "out")["quarantined"] == 0
    assert quarantined_rows(tmp_path / "out", "train") == {}


def test_unreadable_or_missing_pairs_are_named(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_text("hello")
    message, _ = run_failing(path, tmp_path / "out")
    assert message.startswith("validate: pairs.parquet (train): not a readable parquet file")
    with pytest.raises(FileNotFoundError, match="nothing"):
        run_validate(tmp_path / "nothing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no train shards in"):
        run_validate(tmp_path / "empty", tmp_path / "out")


def test_a_crash_keeps_the_previous_outputs(tmp_path, monkeypatch):
    path = write_pairs(good_pairs_frame(), tmp_path / "pairs.parquet")
    run_validate(path, tmp_path / "out")
    before = (tmp_path / "out" / "report.json").read_text()

    def crash(*args, **kwargs):
        raise RuntimeError("GX died")

    monkeypatch.setattr(pair_validation, "run_gx", crash)
    with pytest.raises(RuntimeError, match="GX died"):
        run_validate(path, tmp_path / "out")
    assert (tmp_path / "out" / "report.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")) == []


def test_main_exits_nonzero_with_the_message_on_stderr(tmp_path, mlflow_db, capsys):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    good_pairs_frame().drop(columns=["label_1"]).to_parquet(pairs / "train-00000.parquet", index=False)
    with pytest.raises(SystemExit) as exit_info:
        validate.main(["--params", str(REPO_ROOT / "params.yaml"), "-S", "validate.min_rows=10",
                       "--pairs-dir", str(pairs), "--out-dir", str(tmp_path / "report")])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "spo validate: train-00000.parquet (train): missing required column 'label_1'" in err
    runs = {r.info.run_name: r for r in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("spo-digits").experiment_id])}
    assert runs["validate"].info.status == "FAILED" and runs["pipeline"].info.status == "FAILED"


def test_schema_rules_agree_with_the_pickapic_module():
    """validate keeps its own copy (its image workers must not import torch); it must match pickapic's."""
    from spo.data import pickapic

    assert set(pair_validation.REQUIRED_COLUMNS) == set(pickapic.REQUIRED_COLUMNS)
    assert pair_validation.schema_problems(pickapic.PICKAPIC_SCHEMA) == []


def test_image_check_needs_a_full_decode():
    good = good_pairs_frame(1).at[0, "jpg_0"]
    assert pair_validation.image_error(good) is None
    assert pair_validation.image_error(truncated(good)).startswith("OSError: image file is truncated")
    assert pair_validation.image_error(None) == "missing (null)"
    assert "0x" not in pair_validation.image_error(CORRUPT_JPEG)  # no addresses: the same file every run


def test_validate_reads_pairs_without_torch():
    """The image workers import spo.data.pair_validation: spawning them must not load torch."""
    import subprocess
    import sys

    code = "import sys, spo.data.pair_validation, spo.stages.validate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    assert out.stdout.strip() == "False"


def test_quarantine_columns_are_read_without_images(faulty_run):
    frame = read_quarantine(faulty_run[0], columns=["shard", "row"])
    assert list(frame.columns) == ["shard", "row"] and frame["row"].dtype == np.int64
    assert isinstance(pd.read_parquet(faulty_run[0] / "quarantine.parquet").at[0, "jpg_0"], bytes)
