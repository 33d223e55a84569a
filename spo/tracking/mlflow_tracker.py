"""MLflow implementation of Tracker: one parent run per pipeline run, one nested run per stage.

Which parent a stage nests under:
1. `SPO_PARENT_RUN_ID` when set (wrappers, and the processes of a distributed stage, set it);
2. else, under KFP (`KFP_RUN_ID`, from the pod's `pipeline/runid` label), the parent tagged `kfp.run_id`
   with that id: the pipeline's uncached first step creates it, so no stage needs its id as an input
   (which would defeat KFP's cache), and its exit handler ends it (`close_pipeline_run`);
3. else, under `dvc repro`, the RUNNING parent tagged with that `dvc` process's session key
   (host:pid:start time), created by the first stage of the invocation;
4. else a standalone parent for this one stage.
Every stage marks the parent RUNNING while it runs and ends it by its own outcome (FINISHED, FAILED, or
KILLED on Ctrl-C/SIGTERM/SIGHUP), so a partial `dvc repro -s STAGE` leaves no parent RUNNING; the next
stage of the same run reopens it. A run whose process died without ending it (SIGKILL, OOM, a killed
`dvc`) is ended KILLED by the next stage that opens the experiment: runs carry the key (host:pid:start)
of the process that ends them, and a dead key is never read as success.
Under `dvc exp run` runs are tagged `spo.dvc_experiment` with the experiment's name.
Secrets (tracking passwords/tokens, HF_TOKEN) are never written as params or tags.
"""

from __future__ import annotations

import math
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus, RunTag
from PIL import Image

from spo.config import Config, flat_params

PARENT_RUN_ENV = "SPO_PARENT_RUN_ID"
SESSION_TAG = "spo.session"
STAGE_TAG = "spo.stage"
PROCESS_TAG = "spo.process"  # host:pid:start of the process that ends the run
EXPERIMENT_TAG = "spo.dvc_experiment"
END_REASON_TAG = "spo.end_reason"
PARENT_RUN_NAME = "pipeline"
KFP_RUN_ENV = "KFP_RUN_ID"  # set on every KFP task from its pod's `pipeline/runid` label
KFP_UI_ENV = "SPO_KFP_UI_URL"  # the KFP UI (cluster.kfp_ui_url): runs link to their KFP run
KFP_RUN_TAG = "kfp.run_id"
KFP_URL_TAG = "kfp.run_url"
KFP_STATE_TAG = "kfp.state"
SECRET_ENV_VARS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN",
                   "HUGGING_FACE_HUB_TOKEN", "KFP_TOKEN")
# a key whose last dotted part is, or ends in `_`, one of these (hf_token, login.password; not tokenizer)
SECRET_KEY_PATTERN = re.compile(r"(^|_)(password|passwd|secret|token|api_key|apikey|access_key)$", re.IGNORECASE)
REDACTED = "***"


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI, else `mlflow.db` at the repository root (MLflow 3 refuses the file store).

    The root is DVC_ROOT when DVC runs the stage: under `dvc exp run --temp`/`--queue` the cwd is a copy
    in .dvc/tmp/exps that DVC deletes, and DVC_ROOT names the user's repository. Else the current dir.
    """
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd()).absolute()
    return f"sqlite:///{root / 'mlflow.db'}"


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM/SIGHUP inside `stage_tracker`: unwinds like Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)  # the shell's exit status for a signal
        self.signum = signum


def run_status(error: BaseException | None) -> str:
    """FINISHED, KILLED for Ctrl-C and termination signals, FAILED for anything else raised."""
    if error is None:
        status = RunStatus.FINISHED
    elif isinstance(error, (KeyboardInterrupt, Terminated)):
        status = RunStatus.KILLED
    else:
        status = RunStatus.FAILED
    return RunStatus.to_string(status)


@contextmanager
def _termination_raises() -> Iterator[None]:
    """SIGTERM/SIGHUP raise Terminated (once; a second one kills) so `finally` blocks end the runs.

    Only in the main thread, and only for signals still at their default (an app's handler stays).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def redact(items: Mapping[str, Any]) -> dict[str, str]:
    """Drop secret-looking keys and mask values equal to a secret from the environment."""
    secrets = {os.environ[name] for name in SECRET_ENV_VARS if os.environ.get(name)}
    out = {}
    for key, value in items.items():
        if SECRET_KEY_PATTERN.search(key.rsplit(".", 1)[-1]):
            continue
        text = str(value)
        out[key] = REDACTED if text in secrets or any(s in text for s in secrets) else text
    return out


def flat_metrics(result: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) result dict, keys joined with dots; everything else is skipped."""
    out: dict[str, float] = {}
    for key, value in result.items():
        if isinstance(value, Mapping):
            out.update(flat_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


class MLflowTracker:
    """Tracker writing to one MLflow run through the client (no global active-run state needed)."""

    def __init__(self, client: MlflowClient, run_id: str, experiment_id: str, pipeline_run_id: str | None = None) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.pipeline_run_id = pipeline_run_id  # the parent run of a stage run; None: this run is the top

    def log_params(self, params: Mapping[str, Any]) -> None:
        clean = redact(params)
        self.client.log_batch(self.run_id, params=[Param(k, v[:6000]) for k, v in clean.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def log_pipeline_metrics(self, metrics: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items() if math.isfinite(float(v))]
        self.client.log_batch(self.pipeline_run_id or self.run_id, metrics=batch)

    def log_image(self, image: Image.Image, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(local_path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in redact(tags).items()])

    @contextmanager
    def child(self, name: str) -> Iterator[MLflowTracker]:
        """A run nested under this one (e.g. one per model an evaluation compares)."""
        tags = {"mlflow.parentRunId": self.run_id, PROCESS_TAG: process_key(os.getpid())}
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        child = MLflowTracker(self.client, run.info.run_id, self.experiment_id, self.pipeline_run_id)
        with _ended(self.client, child.run_id):
            yield child


@contextmanager
def _ended(client: MlflowClient, run_id: str) -> Iterator[None]:
    """End a run FINISHED, or by what the block raises (KILLED, FAILED)."""
    try:
        yield
    except BaseException as err:
        client.set_terminated(run_id, run_status(err))
        raise
    client.set_terminated(run_id, run_status(None))


# ----------------------------------------------------------------------------------------------------
# which pipeline run is this?


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def _process_start(pid: int) -> str | None:
    """A process's start time (distinguishes a reused pid), or None if it does not exist.

    On Linux the clock ticks since boot from /proc: psutil's create_time adds the boot time, which moves
    when the wall clock is stepped (NTP), so two stages of one `dvc repro` could see different keys."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[19]  # clock ticks since boot
        except (OSError, IndexError):
            return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def _parent_pid(pid: int) -> int | None:
    try:
        import psutil
    except ImportError:
        try:
            return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            return None
    try:
        return psutil.Process(pid).ppid()
    except psutil.Error:
        return None


def _cmdline(pid: int) -> list[str]:
    try:
        import psutil
    except ImportError:
        try:
            return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        except OSError:
            return []
    try:
        return psutil.Process(pid).cmdline()
    except psutil.Error:
        return []


def _is_dvc(argv: list[str]) -> bool:
    """`dvc ...`, `python /path/bin/dvc ...`, `sh /path/dvc ...` or `python -m dvc ...`."""
    return any(Path(a).name == "dvc" for a in argv[:2]) or argv[1:3] == ["-m", "dvc"]


def process_key(pid: int) -> str:
    """host:pid:start time: names one process, even after its pid is reused."""
    return f"{socket.gethostname()}:{pid}:{_process_start(pid)}"


def dvc_session_key() -> str | None:
    """host:pid:start of the nearest `dvc` ancestor process, or None when not run by DVC."""
    pid = _parent_pid(os.getpid())
    while pid and pid > 1:
        if _is_dvc(_cmdline(pid)):
            return process_key(pid)
        pid = _parent_pid(pid)
    return None


def _session_alive(key: str) -> bool:
    """Is the process named by a key (a `dvc` session, a stage) still running (same pid, same start)?"""
    host, pid, start = key.rsplit(":", 2)
    if host != socket.gethostname():
        return True  # cannot tell: leave other machines' runs alone
    return pid.isdigit() and _process_start(int(pid)) == start


# ----------------------------------------------------------------------------------------------------
# parent and nested runs


def start_parent_run(client: MlflowClient, experiment_id: str, cfg: Config,
                     session: str | None = None, process: str | None = None) -> str:
    """Create the RUNNING parent of one pipeline run; all params flat on it. Returns its id.

    `session`: the `dvc` process whose stages share it; else None (KFP's, or a standalone stage's:
    `process` then names the stage process that ends it).
    """
    tags = {"spo.profile": cfg.profile, "spo.pipeline": "true", **_run_tags()}
    if session:
        tags[SESSION_TAG] = session
    elif process:
        tags[PROCESS_TAG] = process
    experiment = os.environ.get("DVC_EXP_NAME")
    name = f"{PARENT_RUN_NAME}-{experiment}" if experiment else PARENT_RUN_NAME
    run = client.create_run(experiment_id, tags=redact(tags), run_name=name)
    MLflowTracker(client, run.info.run_id, experiment_id).log_params(flat_params(cfg))
    return run.info.run_id


def open_pipeline_run(cfg: Config) -> str:
    """The parent run of this KFP run (its first step): created once, found again by a retried step."""
    client, experiment_id = _client_and_experiment(cfg)
    if os.environ.get(KFP_RUN_ENV) and (found := _kfp_parent(client, experiment_id)):
        return found
    return start_parent_run(client, experiment_id, cfg)


def _kfp_parent(client: MlflowClient, experiment_id: str) -> str | None:
    runs = client.search_runs([experiment_id], f"tags.`{KFP_RUN_TAG}` = '{os.environ[KFP_RUN_ENV]}' and "
                              "tags.`spo.pipeline` = 'true'", max_results=1)
    return runs[0].info.run_id if runs else None


def close_pipeline_run(cfg: Config, state: str, message: str = "") -> str | None:
    """KFP's exit handler: end what a killed pod left RUNNING. Runs still RUNNING under this KFP run's
    parent end FAILED (a stage process that ends its own run never leaves one); the parent ends FAILED
    unless the pipeline SUCCEEDED. Returns the parent's id (None if the first step never made one)."""
    client, experiment_id = _client_and_experiment(cfg)
    parent = _kfp_parent(client, experiment_id)
    if parent is None:
        return None
    failed = RunStatus.to_string(RunStatus.FAILED)
    reason = f"KFP run ended {state} while this run was RUNNING (its pod was killed?)"
    for run in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}' and "
                                  "attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, END_REASON_TAG, reason)
        client.set_terminated(run.info.run_id, failed)
    client.set_tag(parent, KFP_STATE_TAG, state)
    if message:
        client.set_tag(parent, "kfp.error", message[:5000])
    if state != "SUCCEEDED":
        client.set_terminated(parent, failed)
    elif client.get_run(parent).info.status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED))
    return parent


def _client_and_experiment(cfg: Config) -> tuple[MlflowClient, str]:
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.tracking.experiment)
    if experiment is not None:
        return client, experiment.experiment_id
    return client, client.create_experiment(cfg.tracking.experiment, artifact_location=_artifact_location(uri, cfg))


def _artifact_location(uri: str, cfg: Config) -> str | None:
    """For a sqlite store, artifacts live in `mlruns/` beside the db file (not in whatever the cwd is)."""
    if not uri.startswith("sqlite:///"):
        return None  # a server decides
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in cfg.tracking.experiment)
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlruns" / name).as_uri()


def kfp_run_url(run_id: str) -> str | None:
    """The KFP UI page of a run, when the UI's address is known (SPO_KFP_UI_URL)."""
    ui = os.environ.get(KFP_UI_ENV, "").rstrip("/")
    return f"{ui}/#/runs/details/{run_id}" if ui else None


def _run_tags() -> dict[str, str]:
    """Tags every run of this process gets: the git commit, the DVC experiment's name, the KFP run."""
    tags = {}
    if kfp_run := os.environ.get(KFP_RUN_ENV):
        tags[KFP_RUN_TAG] = kfp_run
        if url := kfp_run_url(kfp_run):
            tags[KFP_URL_TAG] = url
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    if experiment := os.environ.get("DVC_EXP_NAME"):
        tags[EXPERIMENT_TAG] = experiment
    return tags


def _close_dead_runs(client: MlflowClient, experiment_id: str) -> None:
    """End KILLED the RUNNING runs whose process is gone: a stage killed with SIGKILL (its nested run,
    a standalone parent) or a `dvc` that exited while its parent was RUNNING. A run's stage process
    that still runs (an orphan of a killed `dvc`) ends its own run; its dead session's parent is ended."""
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        key = run.data.tags.get(SESSION_TAG) or run.data.tags.get(PROCESS_TAG)
        if key and not _session_alive(key):
            client.set_tag(run.info.run_id, END_REASON_TAG, f"its process {key} ended without ending the run")
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))


def _end_parent(client: MlflowClient, parent_id: str, status: str) -> None:
    """End the parent by this stage's outcome, unless it succeeded and another process ended the
    parent badly meanwhile (a dead `dvc` session closed by a newer one): bad news is not overwritten."""
    current = client.get_run(parent_id).info.status
    if current == "RUNNING" or status != RunStatus.to_string(RunStatus.FINISHED):
        client.set_terminated(parent_id, status)


def _close_replaced_tries(client: MlflowClient, experiment_id: str, parent_id: str, stage: str) -> None:
    """A KFP retry of a stage whose pod was killed: its earlier try's run, still RUNNING, ends FAILED."""
    for run in client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                  f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'RUNNING'"):
        client.set_tag(run.info.run_id, END_REASON_TAG, "a retry of this KFP task replaced it (its pod died)")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))


def resolve_parent(client: MlflowClient, experiment_id: str, cfg: Config) -> str:
    """The parent run id: KFP's or this `dvc repro`'s (reopened: RUNNING while this stage runs), or a new one."""
    running = RunStatus.to_string(RunStatus.RUNNING)
    if parent := os.environ.get(PARENT_RUN_ENV):
        client.get_run(parent)  # fails early, naming the id, if it does not exist
        client.update_run(parent, status=running)  # a retried task reopens what its failed try ended
        return parent
    if os.environ.get(KFP_RUN_ENV):
        parent = _kfp_parent(client, experiment_id) or start_parent_run(client, experiment_id, cfg)
        client.update_run(parent, status=running)  # a retried task reopens what its failed try ended
        return parent
    session = dvc_session_key()
    if session is None:
        return start_parent_run(client, experiment_id, cfg, process=process_key(os.getpid()))
    found = client.search_runs([experiment_id], f"tags.`{SESSION_TAG}` = '{session}'", max_results=1)
    if found:
        client.update_run(found[0].info.run_id, status=running)
        return found[0].info.run_id
    return start_parent_run(client, experiment_id, cfg, session)


@contextmanager
def stage_tracker(stage: str, cfg: Config) -> Iterator[MLflowTracker]:
    """Open the stage's nested run (active for `mlflow.*` calls inside); end runs by the outcome.

    Inside, SIGTERM/SIGHUP raise Terminated (see `_termination_raises`): the runs end KILLED.
    """
    with _termination_raises():
        client, experiment_id = _client_and_experiment(cfg)
        _close_dead_runs(client, experiment_id)
        parent_id = resolve_parent(client, experiment_id, cfg)
        if os.environ.get(KFP_RUN_ENV):
            _close_replaced_tries(client, experiment_id, parent_id, stage)
        tags = {"mlflow.parentRunId": parent_id, STAGE_TAG: stage, "spo.profile": cfg.profile,
                PROCESS_TAG: process_key(os.getpid()), **_run_tags()}
        run_id = client.create_run(experiment_id, tags=redact(tags), run_name=stage).info.run_id
        status = run_status(None)
        try:
            tracker = MLflowTracker(client, run_id, experiment_id, pipeline_run_id=parent_id)
            section = getattr(cfg, stage, None)
            if section is not None:
                tracker.log_params(flat_params(section, f"{stage}."))
            mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None)
            yield tracker
        except BaseException as err:
            status = run_status(err)
            raise
        finally:
            _end_stage_runs(client, run_id, parent_id, status)


def _end_stage_runs(client: MlflowClient, run_id: str, parent_id: str, status: str) -> None:
    active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:  # it failed before it became the active run
        client.set_terminated(run_id, status)
    _end_parent(client, parent_id, status)
