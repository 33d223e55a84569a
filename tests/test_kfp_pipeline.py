"""The Kubeflow pipeline: the compiled structure and pod settings (both YAML documents), one component
per stage, cache keys that survive a sweep, the MLflow parent by KFP run id, and a kfp.local run."""

import ast
import hashlib
import importlib
import inspect
import json
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import yaml
from conftest import REPO_ROOT, good_pairs_frame, tiny_digits_params

pytest.importorskip("kfp")
from kfp.dsl import HTML, Artifact, Dataset, Metrics  # noqa: E402

from components.stages import STAGE_FUNCTIONS, STEP_FUNCTIONS  # noqa: E402
from pipelines import cli  # noqa: E402
from spo.config import load_profile  # noqa: E402
from spo.stages import STAGE_SECTIONS, STAGES  # noqa: E402

GPU_STAGES = {"train_spm", "train_spo", "evaluate", "train_dpo"}  # in the sd15 profile
TRAINING = {"train_spm", "train_spo", "train_dpo"}
SECRET_VALUES = {"MLFLOW_TRACKING_PASSWORD": "pw-must-not-leak", "HF_TOKEN": "hf_must_not_leak",
                 "KFP_TOKEN": "kfp-must-not-leak", "MLFLOW_TRACKING_USERNAME": "user-must-not-leak"}
CLUSTER = ["-S", "cluster.mlflow_tracking_uri=http://mlflow.mlflow.svc:5000", "-S", "cluster.pvc=spo-cache",
           "-S", "cluster.mlflow_credentials_secret=mlflow-auth", "-S", "cluster.hf_token_secret=hf-token",
           "-S", "cluster.kfp_ui_url=https://kubeflow.example.com/pipeline",
           "-S", "cluster.gpu_node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}"]


def compile_profile(tmp_path, profile, *extra, monkeypatch=None):
    out = tmp_path / f"{profile}-{hashlib.sha1(str(extra).encode()).hexdigest()[:8]}.yaml"
    assert cli.main(["compile", "--profile", profile, "--output", str(out), *CLUSTER, *extra]) == 0
    text = out.read_text()
    docs = list(yaml.safe_load_all(text))
    return text, docs[0], (docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] if len(docs) > 1 else {})


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    """The sd15 profile compiled for a cluster, with secrets in the environment that must not leak."""
    with pytest.MonkeyPatch.context() as mp:
        for key, value in SECRET_VALUES.items():
            mp.setenv(key, value)
        return compile_profile(tmp_path_factory.mktemp("kfp"), "sd15")


def kfp_name(stage):
    return stage.replace("_", "-")


def dag_tasks(spec):
    """The tasks inside the exit handler (every step but the handler's own task)."""
    return spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]


def test_one_component_per_stage_named_like_dvc_stages():
    dvc = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert list(STAGE_FUNCTIONS) == list(STAGES) == list(dvc)
    assert [f.__name__ for f in STAGE_FUNCTIONS.values()] == list(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_sections_cover_what_dvc_tracks(stage):
    """The sections KFP hands a stage are the (top-level names of the) params DVC tracks for it, plus
    tracking: one source of what shapes a stage's output, for both caches."""
    dvc_params = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"][stage]["params"]
    assert set(STAGE_SECTIONS[stage]) == {p.split(".")[0] for p in dvc_params} | {"tracking"}


@pytest.mark.parametrize("stage", STAGES)
def test_component_bodies_only_wire(stage):
    """<= 15 statements, lazy imports, and the stage's own run() through run_component_stage."""
    source = textwrap.dedent(inspect.getsource(STAGE_FUNCTIONS[stage]))
    func = ast.parse(source).body[0]
    body = func.body[1:] if isinstance(func.body[0], ast.Expr) else func.body  # skip the docstring
    assert len(body) <= 15
    assert f'cfg = component_config(stage_params, "{stage}")' in source
    assert f'run_component_stage("{stage}", stage_params, cfg' in source
    assert [a.arg for a in func.args.args][0] == "stage_params"  # the view is the only config input


def test_compiled_dag_matches_dvc(sd15):
    _, spec, _ = sd15
    assert set(spec["root"]["dag"]["tasks"]) == {"close-mlflow-run", "exit-handler-1"}
    tasks = dag_tasks(spec)
    assert set(tasks) == {kfp_name(s) for s in STAGES} | {"configure", "open-mlflow-run"}
    steps = {"configure", "open-mlflow-run"}
    upstream = {name: set(task.get("dependentTasks", [])) - steps for name, task in tasks.items()}
    assert upstream[kfp_name("prepare")] == set()
    assert upstream[kfp_name("validate")] == {"prepare"}
    assert upstream[kfp_name("train_spm")] == {"prepare", "validate"}  # a failing validation stops training
    assert upstream[kfp_name("train_spo")] == {"prepare", "train-spm"}
    assert upstream[kfp_name("train_dpo")] == {"prepare", "validate"}  # beside the SPM and SPO, not after them
    assert upstream[kfp_name("evaluate")] == {"prepare", "train-spm", "train-spo", "train-dpo"}
    assert upstream[kfp_name("register")] == {"prepare", "train-spo", "train-dpo", "evaluate"}
    for stage in STAGES:  # after the parent run exists, but its id is not an input (the cache would break)
        assert {"configure", "open-mlflow-run"} <= set(tasks[kfp_name(stage)]["dependentTasks"])
        assert set(tasks[kfp_name(stage)]["inputs"].get("parameters", {})) == {"stage_params"}
    exit_task = spec["root"]["dag"]["tasks"]["close-mlflow-run"]
    assert exit_task["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs on failure too


def test_gpu_tasks_get_gpus_pool_shm_and_retries_cpu_tasks_none(sd15):
    _, spec, k8s = sd15
    executors, tasks = spec["deploymentSpec"]["executors"], dag_tasks(spec)
    cfg = load_profile("sd15", require_implemented=False).cluster
    for stage in STAGES:
        container = executors[f"exec-{kfp_name(stage)}"]["container"]
        platform = k8s[f"exec-{kfp_name(stage)}"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        accelerator = container["resources"].get("accelerator")
        assert container["resources"]["resourceCpuRequest"] == getattr(cfg.stages, stage).cpu
        assert container["resources"]["resourceMemoryRequest"] == getattr(cfg.stages, stage).memory
        if stage in GPU_STAGES:
            gpus = str(getattr(cfg.stages, stage).gpus)
            assert (accelerator["resourceType"], accelerator["resourceCount"]) == ("nvidia.com/gpu", gpus)
            assert env["SPO_NUM_PROCESSES"] == gpus  # accelerate launches one process per GPU
            assert platform["nodeSelector"]["labels"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
            assert platform["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
            assert platform["emptyDirMounts"] == [{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                                                   "sizeLimit": "64Gi"}]
        else:
            assert accelerator is None and "SPO_NUM_PROCESSES" not in env
            assert not {"nodeSelector", "tolerations", "emptyDirMounts"} & set(platform)
        if stage in TRAINING:
            assert tasks[kfp_name(stage)]["retryPolicy"] == {"maxRetryCount": 2, "backoffDuration": "60s",
                                                             "backoffFactor": 2.0, "backoffMaxDuration": "3600s"}
            assert env["SPO_CHECKPOINT_ROOT"] == "/mnt/spo/checkpoints"  # on the PVC: a retry resumes there
        else:
            assert "retryPolicy" not in tasks[kfp_name(stage)] and "SPO_CHECKPOINT_ROOT" not in env
        assert platform["pvcMount"][0]["mountPath"] == "/mnt/spo" and platform["pvcMount"][0]["constant"] == "spo-cache"
        assert env["HF_HOME"] == "/mnt/spo/hf" and env["MLFLOW_TRACKING_URI"] == "http://mlflow.mlflow.svc:5000"
        assert container["image"] == "ghcr.io/spo-pipeline/spo:0.1.0-cuda"
        assert "pip install" not in " ".join(container["command"])  # nothing installed at run time


def test_secrets_reach_pods_as_env_from_kubernetes_and_never_as_values(sd15):
    text, spec, k8s = sd15
    for value in SECRET_VALUES.values():
        assert value not in text
    for executor in spec["deploymentSpec"]["executors"]:
        if executor == "exec-configure":  # cuts the config: talks to nobody
            assert "secretAsEnv" not in k8s.get(executor, {})
            continue
        refs = {(s["secretName"], e["secretKey"], e["envVar"]) for s in k8s[executor]["secretAsEnv"] for e in s["keyToEnv"]}
        assert {("mlflow-auth", "username", "MLFLOW_TRACKING_USERNAME"),
                ("mlflow-auth", "password", "MLFLOW_TRACKING_PASSWORD")} <= refs
        if executor.removeprefix("exec-").replace("-", "_") in STAGES:
            assert ("hf-token", "token", "HF_TOKEN") in refs
        assert {"name": "KFP_RUN_ID", "fieldPath": "metadata.labels['pipeline/runid']"} in k8s[executor]["fieldPathAsEnv"]
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert list(params) == ["params_yaml"]  # no credential is a parameter


def test_caching_on_for_deterministic_steps_off_for_side_effects(sd15):
    _, spec, _ = sd15
    tasks = {**dag_tasks(spec), **spec["root"]["dag"]["tasks"]}
    cached = {name for name, task in tasks.items() if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"configure", *(kfp_name(s) for s in STAGES if s != "register")}
    assert not {"open-mlflow-run", "close-mlflow-run", "register"} & cached


def test_digits_compiles_for_cpus_only_and_image_is_an_option(tmp_path):
    _, spec, k8s = compile_profile(tmp_path, "digits", "--image", "registry.example.com/spo:cpu-1")
    for name, executor in spec["deploymentSpec"]["executors"].items():
        assert executor["container"]["image"] == "registry.example.com/spo:cpu-1"
        assert "accelerator" not in executor["container"].get("resources", {})
        assert "tolerations" not in k8s.get(name, {})


def test_compile_needs_an_mlflow_server(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(out)]) == 2  # params.yaml names none
    assert "cluster.mlflow_tracking_uri: required" in capsys.readouterr().err and not out.exists()
    assert cli.main(["compile", "--output", str(out), "-S", "cluster.mlflow_tracking_uri=sqlite:///mlflow.db"]) == 2
    assert "must be an MLflow server" in capsys.readouterr().err


# --- cache keys ----------------------------------------------------------------------------------------

def cache_keys(spec: dict, params_yaml: str) -> dict[str, str]:
    """Every task's cache fingerprint as KFP's backend computes it (backend/src/v2/cacheutils/cache.go,
    GenerateCacheKey): input artifacts by the artifact they are (here: the producing task's key and output
    name, since a cache hit reuses the producer's artifact), input parameter values, output specs, and
    the container's image, command/args, env and PVCs. Parameters produced upstream (the configure step's
    views) are computed by running that step's function, as the cluster would."""
    tasks = {**spec["root"]["dag"]["tasks"], **dag_tasks(spec)}
    executors = spec["deploymentSpec"]["executors"]
    keys: dict[str, str] = {}
    produced: dict[str, dict] = {}

    def key(name: str) -> str:
        if name in keys:
            return keys[name]
        task = tasks[name]
        params = {}
        for pname, ref in task.get("inputs", {}).get("parameters", {}).items():
            if "taskOutputParameter" in ref:
                out = ref["taskOutputParameter"]
                key(out["producerTask"])
                params[pname] = produced[out["producerTask"]][out["outputParameterKey"]]
            elif "componentInputParameter" in ref:
                params[pname] = params_yaml
            else:
                params[pname] = json.dumps(ref.get("runtimeValue", ref))
        artifacts = {a: f"{key(r['taskOutputArtifact']['producerTask'])}/{r['taskOutputArtifact']['outputArtifactKey']}"
                     for a, r in task.get("inputs", {}).get("artifacts", {}).items()}
        component = spec["components"][task["componentRef"]["name"]]
        container = executors[component["executorLabel"]]["container"]
        body = {"inputArtifactNames": artifacts, "inputParameterValues": params,
                "outputs": component.get("outputDefinitions", {}),
                "container": {"image": container["image"], "cmdArgs": container["command"] + container.get("args", []),
                              "env": container.get("env", [])}}
        keys[name] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        if name == "configure":
            produced[name] = STEP_FUNCTIONS["configure"](params_yaml)._asdict()
        return keys[name]

    for name in tasks:
        if name != "exit-handler-1":
            key(name)
    return keys


def test_a_sweep_over_train_spo_reuses_every_upstream_cache_entry(tmp_path):
    """Two runs that differ only in train_spo.* share the cache keys of every task that does not depend
    on train_spo; train_spo and what reads its output rerun."""
    def keys(*overrides):
        _, spec, _ = compile_profile(tmp_path, "sd15", *overrides)
        default = spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"]
        return cache_keys(spec, default)

    base, swept = keys(), keys("-S", "train_spo.beta=5.0", "-S", "train_spo.learning_rate=1.0e-5")
    uncached = {"open-mlflow-run", "close-mlflow-run"}  # they take the whole config, and run every time
    same = {name for name in base if base[name] == swept[name]}
    assert same == {"prepare", "validate", "train-spm", "train-dpo"}
    assert set(base) - same == {"configure", "train-spo", "evaluate", "register"} | uncached
    # and a change in the evaluation protocol reruns only evaluate and register
    evaluated = keys("-S", "evaluate.num_prompts=100")
    assert {n for n in base if base[n] != evaluated[n]} == {"configure", "evaluate", "register"} | uncached


# --- components run directly -----------------------------------------------------------------------------

def test_validate_component_runs_the_stage_under_the_kfp_runs_parent(mlflow_db, tmp_path, monkeypatch):
    """Component bodies called directly: configure's view, the same stage, the MLflow parent found by the
    KFP run id (as a pod's label gives it), tagged with the run and its KFP UI link."""
    from mlflow import MlflowClient

    monkeypatch.setenv("KFP_RUN_ID", "run-abc")
    monkeypatch.setenv("SPO_KFP_UI_URL", "https://kubeflow.example.com/pipeline")
    params_yaml = yaml.safe_dump({**tiny_digits_params(), "tracking": {"experiment": "spo-kfp"}})  # validate.min_rows 10
    prepared = tmp_path / "prepared"
    (prepared / "pairs").mkdir(parents=True)
    good_pairs_frame().to_parquet(prepared / "pairs" / "train-00000.parquet", index=False)
    views = STEP_FUNCTIONS["configure"](params_yaml)
    assert set(yaml.safe_load(views.validate)) == set(STAGE_SECTIONS["validate"])
    parent = STEP_FUNCTIONS["open_mlflow_run"](params_yaml=params_yaml, kfp_run_id="ignored-env-wins")
    assert STEP_FUNCTIONS["open_mlflow_run"](params_yaml=params_yaml, kfp_run_id="x") == parent  # a retry finds it
    metrics = Metrics(uri=str(tmp_path / "metrics"))
    docs = HTML(uri=str(tmp_path / "docs.html"))
    STAGE_FUNCTIONS["validate"](stage_params=views.validate, prepared=Dataset(uri=str(prepared)),
                                report=Artifact(uri=str(tmp_path / "report")), data_docs=docs, metrics=metrics)
    assert metrics.metadata["quarantined"] == 0.0 and metrics.metadata["rows"] == 24.0
    assert "PASSED" in Path(docs.path).read_text()
    assert json.loads((tmp_path / "report" / "report.json").read_text())["success"]
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("spo-kfp").experiment_id])
    nested = [r for r in runs if r.info.run_name == "validate"]
    assert len(nested) == 1 and nested[0].data.tags["mlflow.parentRunId"] == parent
    for run in (nested[0], client.get_run(parent)):
        assert run.data.tags["kfp.run_id"] == "run-abc"
        assert run.data.tags["kfp.run_url"] == "https://kubeflow.example.com/pipeline/#/runs/details/run-abc"
    assert client.get_run(parent).data.params["train_spo.beta"] == "10.0"  # the parent holds every param


def test_the_exit_handler_ends_what_a_killed_pod_left_running(mlflow_db, monkeypatch):
    """A pod killed mid-stage leaves its run RUNNING: the exit handler ends it FAILED and the parent by the
    pipeline's state; a retry of the stage ends its dead try's run the same way."""
    from kfp.dsl import PipelineTaskFinalStatus
    from mlflow import MlflowClient

    from spo.config import config_from_dict
    from spo.tracking.mlflow_tracker import stage_tracker

    monkeypatch.setenv("KFP_RUN_ID", "run-killed")
    params_yaml = yaml.safe_dump(tiny_digits_params())
    parent = STEP_FUNCTIONS["open_mlflow_run"](params_yaml=params_yaml, kfp_run_id="run-killed")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("spo-digits").experiment_id
    killed = client.create_run(experiment, run_name="train_spo", tags={"mlflow.parentRunId": parent,
                                                                      "spo.stage": "train_spo"}).info.run_id
    with stage_tracker("train_spo", config_from_dict(yaml.safe_load(params_yaml))):  # its retry
        assert client.get_run(killed).info.status == "FAILED"
        orphan = client.create_run(experiment, run_name="evaluate", tags={"mlflow.parentRunId": parent}).info.run_id
    status = PipelineTaskFinalStatus(state="FAILED", pipeline_job_resource_name="r", pipeline_task_name="t",
                                     error_code=1, error_message="Task evaluate failed.")
    STEP_FUNCTIONS["close_mlflow_run"](params_yaml=params_yaml, kfp_run_id="run-killed", status=status)
    assert client.get_run(orphan).info.status == "FAILED"
    assert "KFP run ended FAILED" in client.get_run(orphan).data.tags["spo.end_reason"]
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags["kfp.state"] == "FAILED"


def test_config_errors_stop_before_contacting_the_server(capsys):
    with mock.patch("kfp.Client") as client_cls:
        code = cli.main(["submit", "--host", "http://x", "--params", str(REPO_ROOT / "params.yaml"),
                         "-S", "train_spo.betta=1"])
    assert code == 2 and not client_cls.called
    assert "train_spo.betta" in capsys.readouterr().err


def test_compile_bakes_the_profile_into_the_default(sd15):
    _, spec, _ = sd15
    default = spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"]
    assert "\n" not in default  # a multi-line default breaks kfp's header comment (kubeflow/pipelines#10438)
    expected = yaml.safe_load((REPO_ROOT / "profiles" / "sd15.yaml").read_text())
    expected["cluster"].update(mlflow_tracking_uri="http://mlflow.mlflow.svc:5000", pvc="spo-cache",
                               mlflow_credentials_secret="mlflow-auth", hf_token_secret="hf-token",
                               kfp_ui_url="https://kubeflow.example.com/pipeline",
                               gpu_node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    assert yaml.safe_load(default) == expected


def _require_stages():
    """Skip (naming the file) only while a stage module is not written; import errors still fail."""
    for stage in STAGES:
        if not (REPO_ROOT / "spo" / "stages" / f"{stage}.py").is_file():
            pytest.skip(f"stage module spo/stages/{stage}.py not written yet")


@pytest.mark.slow
def test_run_local_whole_dag_on_tiny_digits(tmp_path, mlflow_db, monkeypatch):
    """kfp.local runs every component in a subprocess, artifacts passed between tasks, one MLflow parent."""
    _require_stages()
    from mlflow import MlflowClient

    monkeypatch.chdir(tmp_path)
    for name in ("KFP_RUN_ID", "SPO_CHECKPOINT_ROOT"):  # run-local sets them for its subprocesses: undo after
        monkeypatch.setenv(name, "")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_digits_params()))
    assert cli.main(["run-local", "--params", str(params), "--pipeline-root", str(tmp_path / "kfp")]) == 0
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("spo-digits").experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["kfp.state"] == "SUCCEEDED"  # the exit handler ran
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {r.data.tags["kfp.run_id"] for r in stages.values()} == {parents[0].data.tags["kfp.run_id"]}
    assert set(stages) == set(STAGES) and {r.info.status for r in stages.values()} == {"FINISHED"}
    registered = list((tmp_path / "kfp").rglob("registration.json"))
    assert len(registered) == 1
    reports = [p for p in (tmp_path / "kfp").rglob("report") if p.parent.name == "evaluate"]  # its HTML output
    assert len(reports) == 1 and 'data-model="spo"' in reports[0].read_text()
    registration = json.loads(registered[0].read_text())
    assert set(registration["registered"]) == {"spo", "dpo"}  # train_dpo ran beside train_spo, both gated
    assert registration["registered"]["spo"]["parent_run_id"] == parents[0].info.run_id


def test_components_import_without_the_pipeline_module():
    """Bodies run inside the image; the module they import (spo.stages.*) must not import kfp."""
    for stage in ("validate", "register"):
        module = importlib.import_module(f"spo.stages.{stage}")
        assert "kfp" not in Path(module.__file__).read_text()


def test_evaluate_shows_its_report_in_the_kfp_ui(sd15):
    """The report and its summary are HTML / Markdown output artifacts: KFP's UI renders those types."""
    outputs = sd15[1]["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outputs["summary"]["artifactType"]["schemaTitle"] == "system.Markdown"
