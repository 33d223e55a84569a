"""The shared command line of every stage: `--params FILE`, DVC-style `-S key=value`, and paths.

Paths come from `dvc.yaml` (or KFP artifacts); knobs come from the params file.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from spo.atomic_write import OutputLockedError, output_lock
from spo.config import Config, ConfigError, load_config
from spo.tracking.progress import terminal_output
from spo.tracking.tracker import Tracker

StageBody = Callable[[Config, argparse.Namespace, Tracker], Any]


def parse_stage_args(stage: str, argv: Sequence[str] | None, paths: Sequence[str]) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=f"spo {stage}", description=f"Run the `{stage}` stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a param, e.g. -S train_spo.beta=5.0")
    for name in paths:  # "name?" is an optional path (default None)
        optional = name.endswith("?")
        name = name.rstrip("?")
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=not optional,
                            default=None)
    args = parser.parse_args(argv)
    return load_config(args.params, args.overrides), args


@contextmanager
def config_errors_exit_2(stage: str) -> Iterator[None]:
    """Bad user input (a ConfigError: bad config, override, or a path it names) -> one line, exit 2.
    Anything else stays a traceback."""
    try:
        yield
    except ConfigError as err:
        print(f"spo {stage}: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def pin_torch_threads(cfg: Config) -> None:
    """Run torch on `cfg.torch_threads` CPU threads (see Config.torch_threads): the same numbers on any
    machine of the CPU family, whatever its core count. Called by every stage, under DVC and KFP."""
    if cfg.torch_threads is not None:
        import torch

        torch.set_num_threads(cfg.torch_threads)


def launched_rank() -> int:
    """This process's rank under `accelerate launch` / torchrun (RANK), 0 when launched alone."""
    import os

    return int(os.environ.get("RANK", "0"))


PROCESSES_ENV = "SPO_NUM_PROCESSES"  # data-parallel processes for the training stages (e.g. GPUs of a node)
ACCELERATE_CONFIG_ENV = "SPO_ACCELERATE_CONFIG"
DEFAULT_ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "one_node.yaml"


def accelerate_command(stage: str, argv: Sequence[str], num_processes: int) -> list[str]:
    """`accelerate launch` of this stage in `num_processes` processes, with the checked-in config (or
    $SPO_ACCELERATE_CONFIG): what `SPO_NUM_PROCESSES=N dvc repro` runs for train_spm and train_spo."""
    import os
    import shutil

    config = os.environ.get(ACCELERATE_CONFIG_ENV) or str(DEFAULT_ACCELERATE_CONFIG)
    if not Path(config).is_file():
        raise ConfigError(f"{ACCELERATE_CONFIG_ENV}: accelerate config not found: {config}")
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    return [launcher, "launch", "--config_file", config, "--num_processes", str(num_processes),
            "-m", "spo.cli", stage, *argv]


def relaunch_data_parallel(stage: str, argv: Sequence[str] | None) -> None:
    """With SPO_NUM_PROCESSES=N > 1 and not yet launched, replace this process by N under accelerate.
    The result does not depend on N (the same global batch), so DVC's hash does not either."""
    import os

    raw = os.environ.get(PROCESSES_ENV, "1")
    if "WORLD_SIZE" in os.environ or raw in ("", "1"):
        return
    if not raw.isdigit() or int(raw) < 1:
        print(f"spo {stage}: {PROCESSES_ENV}={raw!r} is not a positive number of processes", file=sys.stderr)
        raise SystemExit(2)
    with config_errors_exit_2(stage):
        command = accelerate_command(stage, list(sys.argv[2:] if argv is None else argv), int(raw))
    sys.stdout.flush()
    os.execv(command[0], command)


def stage_main(stage: str, argv: Sequence[str] | None, paths: Sequence[str], body: StageBody,
               *, data_parallel: bool = False) -> Any:
    """Parse args, open the stage's tracked run, call `body`; config errors exit 2 with the message.

    Under `accelerate launch` only rank 0 holds the output lock, tracks to MLflow and draws progress bars;
    the other ranks train beside it (spo.training.distributed) with a tracker that records in memory."""
    import os

    from spo.tracking.mlflow_tracker import stage_tracker
    from spo.tracking.tracker import MemoryTracker

    if data_parallel:
        relaunch_data_parallel(stage, argv)
    with config_errors_exit_2(stage):
        cfg, args = parse_stage_args(stage, argv, paths)
    pin_torch_threads(cfg)
    if launched_rank() > 0:
        os.environ["SPO_PROGRESS"] = "0"
        with config_errors_exit_2(stage):
            return body(cfg, args, MemoryTracker())
    out_dir = getattr(args, "out_dir", None)
    with config_errors_exit_2(stage), ExitStack() as stack:  # e.g. a model dir the config names is missing
        stack.enter_context(terminal_output())  # logging on stderr, clear of the progress bars
        if out_dir is not None:  # one writer per output dir, from the start (not only at the final rename)
            try:
                stack.enter_context(output_lock(out_dir))
            except OutputLockedError as err:
                print(f"spo {stage}: {err}", file=sys.stderr)
                raise SystemExit(1) from None
        tracker = stack.enter_context(stage_tracker(stage, cfg))
        return body(cfg, args, tracker)


def component_config(params_yaml: str, parent_run_id: str) -> Config:
    """What every KFP component does first: nest its MLflow run under the pipeline's parent run, parse
    the one-string config (a dict parameter would turn ints into floats) and pin torch's threads."""
    import os

    import yaml

    from spo.config import config_from_dict
    from spo.tracking.mlflow_tracker import PARENT_RUN_ENV

    os.environ[PARENT_RUN_ENV] = parent_run_id
    cfg = config_from_dict(yaml.safe_load(params_yaml))
    pin_torch_threads(cfg)
    return cfg
