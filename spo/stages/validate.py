"""Stage `validate`: check every prepared pair (spo.data.pair_validation) before anything trains on them.

Bad rows are quarantined (`quarantine.parquet`; training skips them), bad tables fail the stage. Writes
`quarantine.parquet`, `report.json`, `report.html`, `metrics.json` and GX Data Docs (`data_docs/`)
together (all or nothing) whatever the verdict, then raises DataValidationError if it failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from spo.atomic_write import atomic_dir
from spo.config import Config
from spo.data.pair_validation import (
    DATA_DOCS_DIR,
    HTML_FILE,
    METRICS_FILE,
    REPORT_FILE,
    DataValidationError,
    validate_pairs,
    write_report,
)
from spo.data.quarantine import QUARANTINE_FILE
from spo.tracking.tracker import Tracker

__all__ = ["DataValidationError", "HTML_FILE", "METRICS_FILE", "QUARANTINE_FILE", "REPORT_FILE", "main", "run"]


def run(cfg: Config, *, pairs_dir: Path, out_dir: Path, tracker: Tracker, workers: int | None = None
        ) -> dict[str, float]:
    """Validate the pairs directory (or one parquet file); write all outputs to `out_dir`; raise if it failed.

    `workers`: image-decoding processes (default one per core, at most 8; 0 decodes in this process)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        report = validate_pairs(cfg, Path(pairs_dir), tmp, quarantine_shown=str(out_dir / QUARANTINE_FILE),
                                workers=workers)
        numbers = write_report(report, tmp)
    tracker.log_metrics(numbers)
    for name in (REPORT_FILE, HTML_FILE, METRICS_FILE):
        tracker.log_artifact(out_dir / name, "validate")
    tracker.log_artifact(out_dir / DATA_DOCS_DIR, f"validate/{DATA_DOCS_DIR}")
    if report["failures"]:
        raise DataValidationError("\n".join(report["failures"]))
    return numbers


def main(argv: list[str] | None = None) -> None:
    from spo.stages.stage_cli import stage_main

    def body(cfg: Config, args: Any, tracker: Tracker) -> dict[str, float]:
        return run(cfg, pairs_dir=args.pairs_dir, out_dir=args.out_dir, tracker=tracker)

    try:
        stage_main("validate", argv, ["pairs_dir", "out_dir"], body)
    except DataValidationError as err:  # its lines start with "validate: "
        print("\n".join(f"spo {line}" for line in str(err).splitlines()), file=sys.stderr)
        raise SystemExit(1) from None
    except FileNotFoundError as err:
        print(f"spo validate: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
