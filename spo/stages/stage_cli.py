"""The shared command line of every stage: `--params FILE`, DVC-style `-S key=value`, and paths.

Paths come from `dvc.yaml` (or KFP artifacts); knobs come from the params file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spo.config import Config, ConfigError, load_config
from spo.tracking.tracker import Tracker

StageBody = Callable[[Config, argparse.Namespace, Tracker], Any]


def parse_stage_args(stage: str, argv: Sequence[str] | None, paths: Sequence[str]) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=f"spo {stage}", description=f"Run the `{stage}` stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a param, e.g. -S train_spo.beta=5.0")
    for name in paths:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=True)
    args = parser.parse_args(argv)
    return load_config(args.params, args.overrides), args


def stage_main(stage: str, argv: Sequence[str] | None, paths: Sequence[str], body: StageBody) -> Any:
    """Parse args, open the stage's tracked run, call `body`; config errors exit 2 with the message."""
    from spo.tracking.mlflow_tracker import stage_tracker

    try:
        cfg, args = parse_stage_args(stage, argv, paths)
    except ConfigError as err:
        print(f"spo {stage}: config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    with stage_tracker(stage, cfg) as tracker:
        return body(cfg, args, tracker)
