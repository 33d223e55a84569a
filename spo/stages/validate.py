"""Stage `validate`: check the preference pairs (spo.data.pair_validation) before anything trains on them.

Writes `report.json`, `report.html` and GX Data Docs (`data_docs/`) whatever the outcome, then fails if
any rule failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from spo.atomic_write import atomic_dir
from spo.config import Config
from spo.data.pair_validation import (
    DATA_DOCS_DIR,
    HTML_FILE,
    REPORT_FILE,
    DataValidationError,
    _html,
    describe_failures,
    validate_pairs,
)
from spo.tracking.tracker import Tracker


def run(cfg: Config, *, pairs_path: Path, out_dir: Path, tracker: Tracker) -> dict[str, float]:
    """Write out_dir/report.json (+ report.html, data_docs/) whatever the outcome; raise if any rule failed."""
    with atomic_dir(out_dir) as tmp:
        report = validate_pairs(cfg, Path(pairs_path), data_docs_dir=tmp / DATA_DOCS_DIR)
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2, default=str) + "\n")
        (tmp / HTML_FILE).write_text(_html(report))
    failed = sum(not e["success"] for e in report["expectations"])
    summary = {"rows": float(report["row_count"]), "expectations": float(len(report["expectations"])),
               "failed_expectations": float(failed)}
    tracker.log_metrics(summary)
    tracker.log_artifact(Path(out_dir) / REPORT_FILE, "validate")
    if failed:
        raise DataValidationError(describe_failures(Path(pairs_path), report["expectations"]))
    return summary


def main(argv: list[str] | None = None) -> None:
    from spo.stages.stage_cli import stage_main

    def body(cfg: Config, args: Any, tracker: Tracker) -> dict[str, float]:
        return run(cfg, pairs_path=args.pairs, out_dir=args.out_dir, tracker=tracker)

    try:
        stage_main("validate", argv, ["pairs", "out_dir"], body)
    except (DataValidationError, FileNotFoundError) as err:
        print(f"spo validate: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
