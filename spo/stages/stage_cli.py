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

from spo.asset_paths import asset_root
from spo.atomic_write import OutputLockedError, output_lock
from spo.config import Config, ConfigError, load_config, read_params
from spo.tracking.progress import terminal_output
from spo.tracking.tracker import Tracker

StageBody = Callable[[Config, argparse.Namespace, Tracker], Any]


def parse_stage_args(stage: str, argv: Sequence[str] | None, paths: Sequence[str]) -> tuple[Config, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=f"spo {stage}", description=f"Run the `{stage}` stage.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--stage-view", action="store_true",
                        help="the params file holds only this stage's sections (how KFP passes them)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a param, e.g. -S train_spo.beta=5.0")
    for name in paths:  # "name?" is an optional path (default None)
        optional = name.endswith("?")
        name = name.rstrip("?")
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=Path, required=not optional,
                            default=None)
    args = parser.parse_args(argv)
    if args.stage_view:
        return stage_view_config(read_params(args.params), stage, args.overrides, where=str(args.params)), args
    return load_config(args.params, args.overrides), args


def stage_view_config(data: dict, stage: str, overrides: Sequence[str] = (), where: str = "") -> Config:
    """A stage's config view (STAGE_SECTIONS) from a raw mapping; errors name `where`."""
    from spo.config import apply_overrides, config_view
    from spo.stages import STAGE_SECTIONS

    try:
        return config_view(apply_overrides(data or {}, list(overrides)), STAGE_SECTIONS[stage])
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}" if where else str(err)) from None


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
DEFAULT_ACCELERATE_CONFIG = asset_root() / "configs" / "accelerate" / "one_node.yaml"  # spo/asset_paths.py


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


def component_config(stage_params: str, stage: str) -> Config:
    """What every KFP stage component does first: parse its config view (one YAML string of the sections
    in STAGE_SECTIONS: a dict parameter would turn ints into floats) and pin torch's threads. The MLflow
    parent is found by the KFP run id (spo.tracking.mlflow_tracker), not passed in."""
    import yaml

    cfg = stage_view_config(yaml.safe_load(stage_params), stage, where=f"{stage} config")
    pin_torch_threads(cfg)
    return cfg


CHECKPOINT_ROOT_ENV = "SPO_CHECKPOINT_ROOT"  # on the cluster's PVC (cluster.pvc): what a retried task resumes from


def component_checkpoint_dir(stage: str) -> Path | None:
    """`$SPO_CHECKPOINT_ROOT/<KFP run id>/<stage>`: every try of one KFP task (a retry after a preempted
    node keeps the run id) sees the same directory and resumes from its newest checkpoint; another run
    starts clean. None without a checkpoint root (no PVC) or outside KFP."""
    import os

    from spo.tracking.mlflow_tracker import KFP_RUN_ENV

    root, run_id = os.environ.get(CHECKPOINT_ROOT_ENV), os.environ.get(KFP_RUN_ENV)
    return run_checkpoint_dir(root, run_id, stage) if root and run_id else None


def run_checkpoint_dir(root: str | Path, run_id: str, stage: str) -> Path:
    """Where one KFP run's task of `stage` checkpoints under a checkpoint root (also a TrainJob's nodes)."""
    return Path(root) / run_id / stage


def run_component_stage(stage: str, stage_params: str, cfg: Config, **paths: Path | None) -> dict:
    """A KFP component's stage: here, or with SPO_NUM_PROCESSES=N > 1 (this node's GPUs, set from
    cluster.stages.<stage>.gpus) as N processes under `accelerate launch`, exactly as `dvc repro` runs it
    (the same CLI, the same result for any N). Returns the stage's metrics."""
    import importlib
    import json
    import os
    import subprocess
    import tempfile

    from spo.tracking.mlflow_tracker import stage_tracker

    processes = int(os.environ.get(PROCESSES_ENV, "1") or "1")
    if processes <= 1:
        with stage_tracker(stage, cfg) as tracker:
            return importlib.import_module(f"spo.stages.{stage}").run(cfg, tracker=tracker, **paths)
    with tempfile.TemporaryDirectory() as tmp:
        params = Path(tmp) / "params.yaml"
        params.write_text(stage_params)
        argv = ["--params", str(params), "--stage-view"]
        for name, path in paths.items():
            if path is not None:
                argv += [f"--{name.replace('_', '-')}", str(path)]
        env = {k: v for k, v in os.environ.items() if k != PROCESSES_ENV}
        subprocess.run(accelerate_command(stage, argv, processes), check=True, env=env)
    return json.loads((Path(paths["out_dir"]) / "metrics.json").read_text())
