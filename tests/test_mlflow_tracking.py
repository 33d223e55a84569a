"""MLflow tracking: one parent run per pipeline run, a nested run per stage, flat params, no secrets."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import digits_config
from mlflow import MlflowClient
from PIL import Image

from spo.tracking import mlflow_tracker as mlflow_tracking
from spo.tracking.mlflow_tracker import open_pipeline_run, stage_tracker

CFG = digits_config(tracking={"experiment": "spo-test"})


def runs_by_name(client):
    experiment = client.get_experiment_by_name("spo-test")
    runs = client.search_runs([experiment.experiment_id])
    return {r.info.run_name: r for r in runs}, runs


def test_standalone_stage_gets_parent_and_nested_run(mlflow_db):
    with stage_tracker("train_spo", CFG) as tracker:
        for step, loss in enumerate([0.9, 0.7, 0.4]):
            tracker.log_metrics({"loss": loss}, step=step)
        tracker.log_image(Image.new("RGB", (4, 4)), "samples/grid.png")
        with tracker.child("base") as child:
            child.log_metrics({"aesthetic": 0.5})

    client = MlflowClient()
    named, runs = runs_by_name(client)
    parent, nested, child = named["pipeline"], named["train_spo"], named["base"]
    assert len(runs) == 3
    assert nested.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["mlflow.parentRunId"] == nested.info.run_id
    assert {r.info.status for r in runs} == {"FINISHED"}  # a standalone parent ends with its stage
    # parent: every param, flat; nested: only the stage's own section
    assert parent.data.params["train_spo.beta"] == "10.0" and parent.data.params["prepare.oracle.temperature"] == "0.05"
    assert parent.data.params["train_spo.lora_targets"] == "['to_q', 'to_k', 'to_v', 'to_out.0']"
    assert set(nested.data.params) == {k for k in parent.data.params if k.startswith("train_spo.")}
    history = client.get_metric_history(nested.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 0.9), (1, 0.7), (2, 0.4)]
    assert [a.path for a in client.list_artifacts(nested.info.run_id, "samples")] == ["samples/grid.png"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    if commit:
        assert nested.data.tags["mlflow.source.git.commit"] == commit


def test_stages_nest_under_env_parent_and_register_ends_it(mlflow_db, monkeypatch):
    parent_id = open_pipeline_run(CFG)
    monkeypatch.setenv("SPO_PARENT_RUN_ID", parent_id)
    client = MlflowClient()
    with stage_tracker("prepare", CFG):
        pass
    assert client.get_run(parent_id).info.status == "FINISHED"  # each stage ends it; the next reopens it
    with stage_tracker("register", CFG):
        pass
    named, runs = runs_by_name(client)
    assert len(runs) == 3 and client.get_run(parent_id).info.status == "FINISHED"
    assert {named[s].data.tags["mlflow.parentRunId"] for s in ("prepare", "register")} == {parent_id}
    assert client.get_run(parent_id).data.params["train_spo.beta"] == "10.0"


def test_failing_stage_marks_nested_and_parent_failed(mlflow_db, monkeypatch):
    parent_id = open_pipeline_run(CFG)
    monkeypatch.setenv("SPO_PARENT_RUN_ID", parent_id)
    with pytest.raises(RuntimeError, match="boom"):
        with stage_tracker("train_spm", CFG):
            raise RuntimeError("boom")
    client = MlflowClient()
    named, _ = runs_by_name(client)
    assert named["train_spm"].info.status == "FAILED"
    assert client.get_run(parent_id).info.status == "FAILED"


def test_dvc_session_groups_stages_and_closes_stale_parents(mlflow_db, monkeypatch):
    host = mlflow_tracking.socket.gethostname()
    monkeypatch.setattr(mlflow_tracking, "dvc_session_key", lambda: f"{host}:999999999:1.00")  # a dead process
    with stage_tracker("prepare", CFG):
        pass  # the first `dvc repro` stops early: its parent is ended by its last stage
    client = MlflowClient()
    stale = runs_by_name(client)[0]["pipeline"]
    assert stale.info.status == "FINISHED"

    session = f"{host}:{os.getpid()}:{mlflow_tracking._process_start(os.getpid())}"  # alive: this process
    monkeypatch.setattr(mlflow_tracking, "dvc_session_key", lambda: session)
    for stage in ("train_spo", "evaluate", "register"):
        with stage_tracker(stage, CFG):
            assert client.get_run(stale.info.run_id).info.status == "FINISHED"
    _, runs = runs_by_name(client)
    parents = [r for r in runs if r.data.tags.get("spo.session") == session]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.info.run_name for r in children) == ["evaluate", "register", "train_spo"]


def test_one_stage_under_a_live_dvc_session_leaves_nothing_running(mlflow_db, monkeypatch):
    """`dvc repro -s train_spo`: the dvc process still runs when the stage ends; its parent must not."""
    session = mlflow_tracking.process_key(os.getpid())  # alive: this process
    monkeypatch.setattr(mlflow_tracking, "dvc_session_key", lambda: session)
    with stage_tracker("train_spo", CFG):
        pass
    _, runs = runs_by_name(MlflowClient())
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


# ----------------------------------------------------------------------------------------------------
# killed stages: real processes, real signals

STAGE_SCRIPT = """\
import signal, sys, time
from pathlib import Path
from spo.atomic_write import atomic_dir
from spo.config import load_profile
from spo.tracking.mlflow_tracker import stage_tracker

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if our parent ignores it
out, ready = Path(sys.argv[1]), Path(sys.argv[2])
with stage_tracker("train_spo", load_profile("digits", ["tracking.experiment=spo-test"])), atomic_dir(out) as tmp:
    (tmp / "half-written").write_text("x")
    ready.write_text("ready")
    time.sleep(120)
"""


def start_stage(tmp_path, under_dvc: bool = False) -> tuple[subprocess.Popen, int]:
    """Run STAGE_SCRIPT (directly, or under a process named `dvc`); return (process, the stage's pid)."""
    script, ready = tmp_path / "stage.py", tmp_path / "ready"
    script.write_text(STAGE_SCRIPT)
    argv = [sys.executable, str(script), str(tmp_path / "out"), str(ready)]
    if under_dvc:
        fake_dvc = tmp_path / "dvc"
        fake_dvc.write_text(f"#!/bin/sh\n{' '.join(argv)}\n")  # sh waits for it, as dvc waits for a stage
        fake_dvc.chmod(0o755)
        argv = [str(fake_dvc), "repro"]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 90
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the stage script never got ready"
        time.sleep(0.1)
    stage_pid = proc.pid
    if under_dvc:
        stage_pid = int(subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()[0])
    return proc, stage_pid


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_end_the_stage_and_parent_killed(mlflow_db, tmp_path, signum):
    proc, pid = start_stage(tmp_path)
    os.kill(pid, signum)
    assert proc.wait(timeout=60) in (128 + signum, -signum), proc.stderr.read()  # stopped, not crashed
    named, runs = runs_by_name(MlflowClient())
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    assert not list(tmp_path.glob(".out.tmp-*")) and not (tmp_path / "out").exists()  # atomic_dir cleaned up


@pytest.mark.parametrize("under_dvc", [True, False], ids=["dvc-session", "standalone"])
def test_sigkilled_stage_is_closed_killed_by_the_next_stage(mlflow_db, tmp_path, monkeypatch, under_dvc):
    """SIGKILL runs no cleanup: the runs stay RUNNING until the next stage finds their processes dead."""
    proc, pid = start_stage(tmp_path, under_dvc=under_dvc)
    os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)  # with the stage gone, the fake `dvc` exits too: its session is dead
    client = MlflowClient()
    dead = runs_by_name(client)[0]
    assert {r.info.status for r in dead.values()} == {"RUNNING"}
    if under_dvc:
        assert dead["pipeline"].data.tags["spo.session"].split(":")[1] == str(proc.pid)

    session = mlflow_tracking.process_key(os.getpid())  # the next `dvc repro`: alive
    monkeypatch.setattr(mlflow_tracking, "dvc_session_key", lambda: session)
    with stage_tracker("prepare", CFG):
        pass
    for run in dead.values():
        closed = client.get_run(run.info.run_id)
        assert closed.info.status == "KILLED", run.info.run_name  # never FINISHED: nothing finished
        assert "ended without ending the run" in closed.data.tags["spo.end_reason"]
    new = [r for r in runs_by_name(client)[1] if r.data.tags.get("spo.session") == session]
    assert len(new) == 1 and new[0].info.status == "FINISHED"


def test_orphan_stage_of_a_dead_dvc_does_not_revive_its_closed_parent(mlflow_db, monkeypatch):
    """`dvc` killed, its stage still running (an orphan): the next `dvc repro` ends the dead session's
    parent; the orphan's own run stays open while it runs, and its success does not overwrite that."""
    host = mlflow_tracking.socket.gethostname()
    monkeypatch.setattr(mlflow_tracking, "dvc_session_key", lambda: f"{host}:999999999:1.00")  # dead dvc
    client = MlflowClient()
    with stage_tracker("train_spo", CFG) as tracker:  # this live process is the orphan
        experiment_id = client.get_experiment_by_name("spo-test").experiment_id
        mlflow_tracking._close_dead_runs(client, experiment_id)  # what the next dvc repro's first stage does
        parent_id = client.get_run(tracker.run_id).data.tags["mlflow.parentRunId"]
        assert client.get_run(parent_id).info.status == "KILLED"
        assert client.get_run(tracker.run_id).info.status == "RUNNING"
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert client.get_run(parent_id).info.status == "KILLED"


def test_runs_are_tagged_and_named_by_the_dvc_experiment(mlflow_db, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-chat")
    with stage_tracker("train_spo", CFG):
        pass
    named, runs = runs_by_name(MlflowClient())
    assert set(named) == {"pipeline-bushy-chat", "train_spo"}
    assert {r.data.tags["spo.dvc_experiment"] for r in runs} == {"bushy-chat"}


def test_default_store_is_at_the_dvc_root(tmp_path, monkeypatch):
    """Under `dvc exp run --temp` the cwd is a throwaway copy; DVC_ROOT names the user's repository."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert mlflow_tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))
    assert mlflow_tracking.tracking_uri() == f"sqlite:///{tmp_path / 'repo' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example")
    assert mlflow_tracking.tracking_uri() == "http://mlflow.example"


def test_session_key_names_the_ancestor_dvc_process(tmp_path):
    """A process named `dvc` runs two children (as `dvc repro` runs stages): both see its key."""
    probe = "from spo.tracking.mlflow_tracker import dvc_session_key; print(dvc_session_key())"
    fake_dvc = tmp_path / "dvc"
    fake_dvc.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "pid $$"
        sh -c '{sys.executable} -c "{probe}"'
        sh -c '{sys.executable} -c "{probe}"'
        """))
    fake_dvc.chmod(0o755)
    lines = subprocess.run([str(fake_dvc), "repro"], capture_output=True, text=True, check=True,
                           cwd=tmp_path).stdout.split()
    pid, first, second = lines[1], lines[2], lines[3]
    assert first == second and first.split(":")[1] == pid


def test_no_session_outside_dvc():
    assert mlflow_tracking.dvc_session_key() is None  # pytest is not run by dvc


def test_secrets_are_never_logged(mlflow_db, monkeypatch):
    secrets = {"MLFLOW_TRACKING_PASSWORD": "pw-s3cr3t-value", "MLFLOW_TRACKING_TOKEN": "tok-s3cr3t-value",
               "HF_TOKEN": "hf_s3cr3tvalue"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    # with a password in the env the sqlite store ignores it; we check nothing of it is stored
    with stage_tracker("train_spo", CFG) as tracker:
        tracker.log_params({"hf_token": "hf_s3cr3tvalue", "login.password": "x", "echo": "pw-s3cr3t-value",
                            "url": "https://user:tok-s3cr3t-value@host", "model.tokenizer": "clip"})
        tracker.set_tags({"auth_token": "tok-s3cr3t-value", "note": "hf_s3cr3tvalue"})
    _, runs = runs_by_name(MlflowClient())
    stored = [(k, v) for r in runs for k, v in {**r.data.params, **r.data.tags}.items()]
    assert not [kv for kv in stored if any(s in kv[1] for s in secrets.values())]
    assert not [k for k, _ in stored if k.lower().endswith(("_token", "password"))]
    nested = [r for r in runs if r.info.run_name == "train_spo"][0]
    assert nested.data.params["echo"] == "***" and nested.data.params["url"] == "***"
    assert nested.data.params["model.tokenizer"] == "clip"  # not a secret just because it says "token"


def test_flat_metrics_keeps_finite_numbers_of_nested_results():
    result = {"loss": 0.5, "steps": 3, "win_rate": {"aesthetic": 0.7, "ci": {"low": 0.6}}, "ok": True,
              "name": "spo", "bad": float("nan")}
    assert mlflow_tracking.flat_metrics(result) == {"loss": 0.5, "steps": 3.0, "win_rate.aesthetic": 0.7,
                                                    "win_rate.ci.low": 0.6}
