"""The pairs validation: good data passes; each kind of bad data fails with a message naming the column."""

import json

import numpy as np
import pytest
from conftest import REPO_ROOT, good_pairs_frame
from mlflow import MlflowClient

from spo.config import load_profile
from spo.data import pair_validation
from spo.stages import validate
from spo.stages.validate import DataValidationError
from spo.tracking.tracker import MemoryTracker

CFG = load_profile("digits", ["validate.min_rows=10", "validate.max_tie_fraction=0.5"])


def run_validate(path, out_dir):
    return validate.run(CFG, pairs_path=path, out_dir=out_dir, tracker=MemoryTracker())


def failing(write_pairs, tmp_path, frame):
    """Validate `frame`; return (error message, report) after checking the report was still written."""
    with pytest.raises(DataValidationError) as err:
        run_validate(write_pairs(frame), tmp_path / "report")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["success"] is False
    return str(err.value), report


def failed_rules(report):
    return {(e["column"], e["expectation"]) for e in report["expectations"] if not e["success"]}


def test_good_pairs_pass_and_report_every_expectation(write_pairs, tmp_path):
    tracker = MemoryTracker()
    summary = validate.run(CFG, pairs_path=write_pairs(good_pairs_frame()), out_dir=tmp_path / "report",
                           tracker=tracker)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["success"] and report["row_count"] == 24
    assert all(e["success"] for e in report["expectations"])
    rules = {e["expectation"] for e in report["expectations"]}
    assert {"expect_column_to_exist", "expect_column_values_to_be_in_type_list", "expect_multicolumn_sum_to_equal", "expect_column_values_to_be_unique",
            "expect_compound_columns_to_be_unique", "images_decodable", "expect_table_row_count_to_be_between",
            "expect_column_values_to_not_be_in_set"} <= rules
    assert summary == {"rows": 24.0, "expectations": float(len(report["expectations"])), "failed_expectations": 0.0}
    assert tracker.last("failed_expectations") == 0.0
    assert "PASSED" in (tmp_path / "report" / "report.html").read_text()
    docs = tmp_path / "report" / "data_docs"  # GX Data Docs of the schema and rules runs, linked from report.html
    assert "data_docs/index.html" in (tmp_path / "report" / "report.html").read_text()
    assert (docs / "index.html").is_file() and len(list((docs / "validations").rglob("*.html"))) == 2


def test_missing_label_column_is_named(write_pairs, tmp_path):
    message, report = failing(write_pairs, tmp_path, good_pairs_frame().drop(columns=["label_1"]))
    assert "column 'label_1'" in message and "missing" in message
    assert failed_rules(report) == {("label_1", "expect_column_to_exist")}


def test_wrong_dtype_is_named(write_pairs, tmp_path):
    frame = good_pairs_frame()
    frame["label_0"] = frame["label_0"].astype(str)
    message, report = failing(write_pairs, tmp_path, frame)
    assert "column 'label_0'" in message and "expected_type=float" in message
    assert failed_rules(report) == {("label_0", "expect_column_values_to_be_in_type_list")}


def test_jpeg_column_of_strings_is_named(write_pairs, tmp_path):
    """The JPEG columns stay out of the rules frame, but their type is checked (on the sampled rows)."""
    frame = good_pairs_frame()
    frame["jpg_0"] = "not bytes"
    message, report = failing(write_pairs, tmp_path, frame)
    assert "column 'jpg_0'" in message and "expected_type=binary" in message
    assert failed_rules(report) == {("jpg_0", "expect_column_values_to_be_in_type_list")}  # and not decoded


@pytest.mark.parametrize("column, value, rule", [
    ("label_0", 0.3, "expect_column_values_to_be_in_set"),
    ("label_1", np.nan, "expect_column_values_to_not_be_null"),
    ("label_1", 1.0, "expect_multicolumn_sum_to_equal"),  # row 0 is (1, 0): now sums to 2
])
def test_bad_labels_are_named(write_pairs, tmp_path, column, value, rule):
    frame = good_pairs_frame()
    frame.loc[0, column] = value
    if rule == "expect_column_values_to_be_in_set":
        frame.loc[0, "label_1"] = 1.0 - value  # keep the sum: only the value set is broken
    message, report = failing(write_pairs, tmp_path, frame)
    assert column in message and rule in message
    assert any(column in str(col) and r == rule for col, r in failed_rules(report))


@pytest.mark.parametrize("caption", ["", "   ", None])
def test_empty_caption_is_named(write_pairs, tmp_path, caption):
    frame = good_pairs_frame()
    frame.loc[5, "caption"] = caption
    message, report = failing(write_pairs, tmp_path, frame)
    assert "column 'caption'" in message
    assert {c for c, _ in failed_rules(report)} == {"caption"}


def test_duplicate_ids_are_named(write_pairs, tmp_path):
    frame = good_pairs_frame()
    frame.loc[3, ["ranking_id", "image_0_uid", "image_1_uid"]] = frame.loc[2, ["ranking_id", "image_0_uid", "image_1_uid"]]
    message, report = failing(write_pairs, tmp_path, frame)
    assert "column 'ranking_id'" in message and "column 'image_0_uid,image_1_uid'" in message
    assert failed_rules(report) == {("ranking_id", "expect_column_values_to_be_unique"),
                                    ("image_0_uid,image_1_uid", "expect_compound_columns_to_be_unique")}


def test_corrupt_jpeg_is_named(write_pairs, tmp_path):
    frame = good_pairs_frame()
    frame.at[7, "jpg_1"] = b"\xff\xd8\xff not really a jpeg"
    message, report = failing(write_pairs, tmp_path, frame)
    assert "column 'jpg_1'" in message and "images_decodable" in message
    bad = [e for e in report["expectations"] if not e["success"]]
    assert len(bad) == 1 and bad[0]["unexpected_examples"][0]["row"] == 7


def test_too_few_rows_and_too_many_ties(write_pairs, tmp_path):
    frame = good_pairs_frame(8)
    frame[["label_0", "label_1"]] = 0.5
    message, report = failing(write_pairs, tmp_path, frame)
    assert "expect_table_row_count_to_be_between" in message and "observed_value=8" in message
    assert ("label_0", "expect_column_values_to_not_be_in_set") in failed_rules(report)


def test_not_a_parquet_names_the_file(tmp_path):
    path = tmp_path / "pairs.parquet"
    path.write_text("hello")
    with pytest.raises(DataValidationError, match="pairs.parquet"):
        run_validate(path, tmp_path / "report")
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        run_validate(tmp_path / "nothing.parquet", tmp_path / "report")


def test_main_exits_nonzero_with_the_report_on_stderr(write_pairs, tmp_path, mlflow_db, capsys):
    path = write_pairs(good_pairs_frame().drop(columns=["label_1"]))
    with pytest.raises(SystemExit) as exit_info:
        validate.main(["--params", str(REPO_ROOT / "params.yaml"), "-S", "validate.min_rows=10",
                       "--pairs", str(path), "--out-dir", str(tmp_path / "report")])
    assert exit_info.value.code == 1
    assert "column 'label_1'" in capsys.readouterr().err
    runs = {r.info.run_name: r for r in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("spo-digits").experiment_id])}
    assert runs["validate"].info.status == "FAILED" and runs["pipeline"].info.status == "FAILED"


def test_schema_rules_agree_with_the_pickapic_module(tmp_path):
    """validate keeps its own copy (no torch import in the check); it must match spo.data.pickapic's schema."""
    import pyarrow as pa

    from spo.data import pickapic

    assert set(pair_validation.REQUIRED_COLUMNS) == set(pickapic.REQUIRED_COLUMNS)
    table = pa.Table.from_pandas(good_pairs_frame()[pickapic.PICKAPIC_SCHEMA.names], schema=pickapic.PICKAPIC_SCHEMA,
                                 preserve_index=False)
    entries = pair_validation.check_schema(pair_validation.gx_context(tmp_path), table)
    assert all(e["success"] for e in entries)
    assert {e["column"] for e in entries if e["expectation"] == "expect_column_values_to_be_in_type_list"} == \
        set(pair_validation.COLUMN_FAMILIES)


def test_pairs_written_by_pickapic_pass(write_pairs, tmp_path):
    from spo.data import pickapic

    path = pickapic.write_pairs(good_pairs_frame(), tmp_path / "pairs.parquet")
    assert run_validate(path, tmp_path / "report")["failed_expectations"] == 0.0
