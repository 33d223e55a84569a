"""pipelines/trainjob.py: the TrainJob / PyTorchJob bodies against the real CRD schemas, the command each
node runs (executed under /bin/sh with a stub `accelerate`, then parsed by accelerate's own parser), and
run_distributed_job against a loopback HTTP server that answers like the Kubernetes API.

Schemas: tests/data/crds/ (see its README for the source tags). OpenAPI v3 as used by CRDs is read as JSON
Schema draft 7 with these adjustments (`strict_schema`):
- `x-kubernetes-int-or-string: true`: controller-gen already writes `anyOf: [{type: integer}, {type: string}]`
  beside it, which draft 7 understands; a node with the flag but no anyOf/type gets that anyOf. A
  quantity's `pattern` then applies to string values only, as in JSON Schema.
- every object schema with `properties` and no `additionalProperties` gets `additionalProperties: false`:
  stricter than the API server (which prunes unknown fields, or rejects them with fieldValidation=Strict),
  so a misspelled field name fails here instead of vanishing on the cluster.
- `x-kubernetes-list-type: map` + `x-kubernetes-list-map-keys` is checked (keys unique within the list).
- `format` (int32, int64, date-time, ...) is not asserted, and CEL rules (`x-kubernetes-validations`) are
  not evaluated: the TrainJob name rule is compared with DistributedJob's own check instead.
`metadata` is `{type: object}` in every CRD (the API server checks ObjectMeta itself).
"""

from __future__ import annotations

import copy
import datetime as dt
import http.server
import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
from dataclasses import replace
from pathlib import Path

import jsonschema
import pytest

from pipelines import trainjob as tj

CRDS = Path(__file__).parent / "data" / "crds"
TRAINJOB_SCHEMA = CRDS / "trainer.kubeflow.org_trainjobs.v2.3.0.schema.json"
PYTORCHJOB_SCHEMA = CRDS / "kubeflow.org_pytorchjobs.v1.9.4.schema.json"
SECRET_VALUE = "s3cr3t-password-value"


# ----------------------------------------------------------------------------------------------------
# schema validation


def strict_schema(node):
    if isinstance(node, list):
        return [strict_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_schema(v) for k, v in node.items()}
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def _list_map_keys(validator, keys, instance, schema):
    if not validator.is_type(instance, "array") or schema.get("x-kubernetes-list-type") != "map":
        return
    seen = set()
    for item in instance:
        key = tuple(item.get(k) for k in keys) if isinstance(item, dict) else (item,)
        if key in seen:
            yield jsonschema.ValidationError(f"duplicate entry for list-map key {dict(zip(keys, key))}")
        seen.add(key)


CRDValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-list-map-keys": _list_map_keys})
_VALIDATORS: dict = {}


def validator(kind: str):
    if kind not in _VALIDATORS:
        schema = strict_schema(json.loads((TRAINJOB_SCHEMA if kind == "TrainJob" else PYTORCHJOB_SCHEMA).read_text()))
        CRDValidator.check_schema(schema)
        _VALIDATORS[kind] = CRDValidator(schema)
    return _VALIDATORS[kind]


def crd_errors(kind: str, body: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator(kind).iter_errors(body)]


def full_job(**changes) -> tj.DistributedJob:
    job = tj.DistributedJob(
        name="spo-train-spo-1a2b3c",
        namespace="kubeflow",
        image="registry.example.com/spo:1.0",
        stage_argv=("train_spo", "--params", "/mnt/spo/runs/1a2b3c/params.yaml", "--prepared-dir",
                    "/mnt/spo/runs/1a2b3c/prepared", "--out-dir", "/mnt/spo/runs/1a2b3c/spo"),
        num_nodes=2,
        gpus_per_node=8,
        cpu="64",
        memory="900Gi",
        env={"MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc.cluster.local:5000", "SPO_PARENT_RUN_ID": "abc123"},
        secret_env=(tj.SecretEnv("mlflow-auth", "password", "MLFLOW_TRACKING_PASSWORD"),
                    ("mlflow-auth", "username", "MLFLOW_TRACKING_USERNAME")),
        pvc_name="spo-shared",
        mount_path="/mnt/spo",
        node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},),
        labels={"kfp-run-id": "1a2b3c", "spo-stage": "train_spo"},
        active_deadline_s=86400,
    )
    return replace(job, **changes)


def _pod_spec_of_trainjob(body: dict) -> dict:
    patches = body["spec"]["runtimePatches"]
    assert [p["manager"] for p in patches] == [tj.RUNTIME_PATCH_MANAGER]
    jobs = patches[0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert [j["name"] for j in jobs] == ["node"]
    return jobs[0]["template"]["spec"]["template"]


def _check_pod_parts(pod_template: dict, container: dict, env: list[dict]):
    spec = pod_template["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert volumes[mounts["/mnt/spo"]]["persistentVolumeClaim"] == {"claimName": "spo-shared"}
    by_name = {e["name"]: e for e in env}
    assert by_name["MLFLOW_TRACKING_PASSWORD"] == {
        "name": "MLFLOW_TRACKING_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "mlflow-auth", "key": "password"}}}
    assert by_name["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": "username"}
    assert by_name["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlflow.svc.cluster.local:5000"
    assert by_name["NCCL_DEBUG"]["value"] == "WARN"
    assert by_name["OMP_NUM_THREADS"]["value"] == "8"  # 64 CPUs / 8 GPU processes
    assert pod_template["metadata"]["labels"] == {"kfp-run-id": "1a2b3c", "spo-stage": "train_spo"}


def test_trainjob_manifest_is_valid_and_complete():
    body = tj.trainjob_manifest(full_job())
    assert crd_errors("TrainJob", body) == []
    assert body["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and body["kind"] == "TrainJob"
    assert body["metadata"]["name"] == "spo-train-spo-1a2b3c" and body["metadata"]["namespace"] == "kubeflow"
    assert body["metadata"]["labels"]["kfp-run-id"] == "1a2b3c"
    spec = body["spec"]
    assert spec["runtimeRef"] == {"name": "torch-distributed", "apiGroup": "trainer.kubeflow.org",
                                  "kind": "ClusterTrainingRuntime"}
    assert spec["activeDeadlineSeconds"] == 86400
    trainer = spec["trainer"]
    assert trainer["image"] == "registry.example.com/spo:1.0"
    assert trainer["numNodes"] == 2
    assert trainer["command"][:2] == ["/bin/sh", "-c"]
    script = trainer["command"][2]
    assert "accelerate launch --multi_gpu" in script and '"$((PET_NNODES * 8))"' in script
    assert "-m spo.cli train_spo --params /mnt/spo/runs/1a2b3c/params.yaml" in script
    res = trainer["resourcesPerNode"]
    assert res["limits"] == res["requests"] == {"nvidia.com/gpu": "8", "cpu": "64", "memory": "900Gi"}
    pod_template = _pod_spec_of_trainjob(body)
    containers = pod_template["spec"]["containers"]
    assert [c["name"] for c in containers] == ["node"]
    assert "env" not in containers[0]  # Trainer's webhook refuses env in a patch of the `node` container
    _check_pod_parts(pod_template, containers[0], trainer["env"])


def test_pytorchjob_manifest_is_valid_and_complete():
    body = tj.pytorchjob_manifest(full_job(num_nodes=3))
    assert crd_errors("PyTorchJob", body) == []
    assert body["apiVersion"] == "kubeflow.org/v1" and body["kind"] == "PyTorchJob"
    assert body["spec"]["runPolicy"]["activeDeadlineSeconds"] == 86400
    replicas = body["spec"]["pytorchReplicaSpecs"]
    assert {k: v["replicas"] for k, v in replicas.items()} == {"Master": 1, "Worker": 2}
    for replica in replicas.values():
        (container,) = replica["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the v1 operator's default container name
        assert container["image"] == "registry.example.com/spo:1.0"
        assert container["resources"]["limits"] == container["resources"]["requests"] == {
            "nvidia.com/gpu": "8", "cpu": "64", "memory": "900Gi"}
        script = container["command"][2]
        assert '--machine_rank "$RANK"' in script and '--main_process_ip "$MASTER_ADDR"' in script
        assert '"$((PET_NNODES * 8))"' in script and "PET_MASTER_ADDR" not in script
        _check_pod_parts(replica["template"], container, container["env"])
    assert "Worker" not in tj.pytorchjob_manifest(full_job(num_nodes=1))["spec"]["pytorchReplicaSpecs"]


def _misspell(d: dict, key: str, wrong: str):
    d[wrong] = d.pop(key)


_TRAINER = ("spec", "trainer")
_MASTER_CONTAINER = ("spec", "pytorchReplicaSpecs", "Master", "template", "spec", "containers", 0)
BROKEN = {  # (kind, where, how): each is something the API server would refuse or silently drop
    "misspelled field": ("TrainJob", _TRAINER, lambda t: _misspell(t, "numNodes", "numnodes")),
    "not a quantity": ("TrainJob", _TRAINER, lambda t: t["resourcesPerNode"]["limits"].update({"cpu": "64 cores"})),
    "duplicate env name": ("TrainJob", _TRAINER, lambda t: t["env"].append(dict(t["env"][0]))),
    "numNodes as string": ("TrainJob", _TRAINER, lambda t: t.update(numNodes="2")),
    "no runtimeRef": ("TrainJob", ("spec",), lambda s: s.pop("runtimeRef")),
    "patch without manager": ("TrainJob", ("spec", "runtimePatches", 0), lambda p: p.pop("manager")),
    "v1 replicas as string": ("PyTorchJob", ("spec", "pytorchReplicaSpecs", "Master"), lambda m: m.update(replicas="1")),
    "v1 misspelled mount": ("PyTorchJob", _MASTER_CONTAINER, lambda c: _misspell(c, "volumeMounts", "volumeMount")),
    "v1 container without name": ("PyTorchJob", _MASTER_CONTAINER, lambda c: c.pop("name")),
    "v1 misspelled runPolicy field": ("PyTorchJob", ("spec", "runPolicy"),
                                      lambda r: _misspell(r, "cleanPodPolicy", "cleanupPolicy")),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_schema_check_rejects_what_the_cluster_would(case):
    kind, where, breaking = BROKEN[case]
    body = tj.manifest(full_job(), kind)
    target = body
    for key in where:
        target = target[key]
    breaking(target)
    assert crd_errors(kind, body), case


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_no_secret_value_reaches_the_manifest(kind, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET_VALUE)
    text = json.dumps(tj.manifest(full_job(), kind))
    assert SECRET_VALUE not in text
    assert text.count('"secretKeyRef"') == (2 if kind == "TrainJob" else 4)  # v1: Master and Worker


def test_name_rule_is_the_crds():
    schema = json.loads(TRAINJOB_SCHEMA.read_text())
    rules = {v["rule"] for v in schema["x-kubernetes-validations"]}
    (pattern,) = [m.group(1) for r in rules if (m := re.search(r"matches\('(.*)'\)", r))]
    assert pattern == tj.NAME_RE.pattern
    assert f"size(self.metadata.name) <= {tj.NAME_MAX}" in rules


@pytest.mark.parametrize(("changes", "field"), [
    ({"name": "SPO-Train"}, "name"),
    ({"name": "9spo"}, "name"),
    ({"name": "spo-"}, "name"),
    ({"name": "s" * 64}, "name"),
    ({"name": "spo_train"}, "name"),
    ({"num_nodes": 0}, "num_nodes"),
    ({"num_nodes": True}, "num_nodes"),
    ({"gpus_per_node": 0}, "gpus_per_node"),
    ({"gpus_per_node": 2.0}, "gpus_per_node"),
    ({"stage_argv": ()}, "stage_argv"),
    ({"memory": "lots"}, "memory"),
    ({"shm_size": "64 GB"}, "shm_size"),
    ({"env": {"PET_NNODES": "4"}}, "env"),
    ({"env": {"SEED": 3}}, "env"),
    ({"secret_env": (("Bad_Secret", "k", "X"),)}, "secret_env"),
    ({"secret_env": (("s", "k", "MLFLOW_TRACKING_URI"),)}, "secret_env"),
    ({"tolerations": ({"key": "a", "operator": "Exist"},)}, "tolerations"),
    ({"mount_path": "/dev/shm"}, "mount_path"),
    ({"active_deadline_s": 0}, "active_deadline_s"),
    ({"node_selector": {"pool": "gpu pool"}}, "node_selector"),
])
def test_bad_spec_is_a_clear_error(changes, field):
    with pytest.raises(ValueError, match=rf"^DistributedJob\.{field}: "):
        full_job(**changes)


def test_largest_valid_name_is_accepted():
    assert full_job(name="s" * 63).name == "s" * 63


def test_attempt_name(monkeypatch):
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    assert tj.attempt_name("spo-a") == "spo-a"
    monkeypatch.setenv("KFP_RETRY_INDEX", "2")
    assert tj.attempt_name("spo-a") == "spo-a-r2"
    long = tj.attempt_name("a" * 60 + "-bc")
    assert long == "a" * 60 + "-r2" and len(long) == 63
    assert tj.attempt_name("a" * 59 + "-bcd") == "a" * 59 + "-r2"  # no "--": trailing '-' trimmed
    with pytest.raises(ValueError, match="KFP_RETRY_INDEX"):
        tj.attempt_name("spo-a", "x")


# ----------------------------------------------------------------------------------------------------
# what each node runs


STUB_ACCELERATE = """#!/bin/sh
for a in "$@"; do printf '%s\\0' "$a"; done
"""


def _run_node_script(tmp_path, script: str, env: dict) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "accelerate"
    stub.write_text(STUB_ACCELERATE)
    stub.chmod(0o755)
    base = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    done = subprocess.run(["/bin/sh", "-c", script], env={**base, **env}, capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().split("\0")[:-1]


def _plain_env(env: list[dict]) -> dict:
    return {e["name"]: e["value"] for e in env if "value" in e}


@pytest.mark.parametrize("kind", ["TrainJob", "PyTorchJob"])
def test_each_node_launches_accelerate_with_the_operators_rendezvous(tmp_path, kind, monkeypatch):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    tricky = "a b;$(echo no)'\""
    job = full_job(stage_argv=("train_spo", "--params", "/mnt/spo/p.yaml", "--note", tricky))
    body = tj.manifest(job, kind)
    if kind == "TrainJob":  # what Trainer's torch plugin injects (torch.go)
        command, env = body["spec"]["trainer"]["command"], body["spec"]["trainer"]["env"]
        operator_env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_NPROC_PER_NODE": "auto",
                        "PET_MASTER_ADDR": "spo-train-spo-1a2b3c-node-0-0.spo-train-spo-1a2b3c",
                        "PET_MASTER_PORT": "29500"}
        master = "spo-train-spo-1a2b3c-node-0-0.spo-train-spo-1a2b3c"
    else:  # what the v1 operator injects into worker 0 (pytorch/envvar.go, master.go)
        container = body["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
        command, env = container["command"], container["env"]
        operator_env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "RANK": "1", "WORLD_SIZE": "2",
                        "MASTER_ADDR": "spo-train-spo-1a2b3c-master-0", "MASTER_PORT": "23456",
                        "PET_MASTER_ADDR": "spo-train-spo-1a2b3c-master-0", "PET_MASTER_PORT": "23456"}
        master = "spo-train-spo-1a2b3c-master-0"
    assert command[:2] == ["/bin/sh", "-c"]
    argv = _run_node_script(tmp_path, command[2], {**_plain_env(env), **operator_env})
    assert argv[0] == "launch"
    args = launch_command_parser().parse_args(argv[1:])  # accelerate itself accepts the flags
    assert args.multi_gpu and args.module and args.same_network
    assert (args.num_machines, args.machine_rank, args.num_processes) == (2, 1, 16)
    assert (args.main_process_ip, str(args.main_process_port)) == (master, operator_env.get("PET_MASTER_PORT"))
    assert args.num_cpu_threads_per_process == 8 and args.mixed_precision == "no" and args.gpu_ids == "all"
    assert args.dynamo_backend == "no" and args.rdzv_backend == "static"
    assert args.training_script == "spo.cli"
    assert args.training_script_args == ["train_spo", "--params", "/mnt/spo/p.yaml", "--note", tricky]
    # what accelerate hands torch's elastic launcher on this node (no GPU needed to compute it)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no default_config.yaml in play
    args, _, _ = _validate_launch_command(args)
    worker_env = prepare_multi_gpu_env(args)
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)
    assert (args.master_addr, args.master_port) == (master, operator_env["MASTER_PORT" if kind != "TrainJob"
                                                                       else "PET_MASTER_PORT"])
    assert worker_env["OMP_NUM_THREADS"] == "8" and worker_env["ACCELERATE_MIXED_PRECISION"] == "no"


def test_node_script_divides_the_cpus_when_no_cpu_limit_is_given(tmp_path):
    job = full_job(cpu=None, gpus_per_node=1, num_nodes=4)
    env = _plain_env(tj.trainjob_manifest(job)["spec"]["trainer"]["env"])
    assert "OMP_NUM_THREADS" not in env
    argv = _run_node_script(tmp_path, tj.launch_script(job), {
        **env, "PET_NNODES": "4", "PET_NODE_RANK": "0", "PET_MASTER_ADDR": "m", "PET_MASTER_PORT": "29500"})
    threads = argv[argv.index("--num_cpu_threads_per_process") + 1]
    assert int(threads) == max(1, len(os.sched_getaffinity(0)))  # nproc / 1 GPU
    assert argv[argv.index("--num_processes") + 1] == "4"


def test_node_script_fails_when_the_operator_env_is_missing(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "accelerate").write_text(STUB_ACCELERATE)
    (bin_dir / "accelerate").chmod(0o755)
    done = subprocess.run(["/bin/sh", "-c", tj.launch_script(full_job())], capture_output=True, timeout=30,
                          env={"PATH": f"{bin_dir}:/usr/bin:/bin", "PET_NNODES": "2"})
    assert done.returncode != 0 and b"PET_NODE_RANK" in done.stderr


# ----------------------------------------------------------------------------------------------------
# a loopback Kubernetes API server


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


def _go_bool(value) -> bool:
    """A bool query parameter as the API server reads it (Go strconv.ParseBool)."""
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in (None, "0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ValueError(value)


def _selector_matches(selector: str, labels: dict) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = re.split(r"==?", term, maxsplit=1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeCluster:
    """An in-memory Kubernetes API with the Trainer / Training Operator CRDs installed and a toy
    controller: creating a job makes its pods (labelled as JobSet / the v1 operator label them), pods stay
    Pending for `pending_lists` pod listings, then run; when a pod's log has been read to the end its
    container exits, and the job ends `outcome` ("complete", "failed" or "hang")."""

    CRDS = {("trainer.kubeflow.org", "v1alpha1", "trainjobs"): "TrainJob",
            ("kubeflow.org", "v1", "pytorchjobs"): "PyTorchJob"}

    def __init__(self, outcome="complete", pending_lists=2, logs=None, pods_never_start=False, unavailable_gets=0):
        self.outcome, self.pending_lists, self.pods_never_start = outcome, pending_lists, pods_never_start
        self.unavailable_gets = unavailable_gets  # the first GETs of a job answer 503 (an API server restart)
        self.logs = logs or {0: ["epoch 0 loss 0.50", "epoch 1 loss 0.25", "saved /mnt/spo/runs/x/spo"],
                             1: ["worker-1 line that must not be printed"]}
        self.objects: dict = {}  # (plural, ns, name) -> object
        self.pods: dict = {}  # (ns, name) -> pod
        self.events: list = []
        self.requests: list = []  # (method, path, query)
        self.posted: list = []
        self.pod_lists = 0
        self.lock = threading.Lock()
        cluster = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                cluster.handle(self, "GET")

            def do_POST(self):
                cluster.handle(self, "POST")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_client(self):
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        return client.ApiClient(cfg)

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    # --- HTTP plumbing

    def _send_json(self, h, code: int, body: dict):
        data = json.dumps(body).encode()
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    def handle(self, h, method: str):
        url = urllib.parse.urlsplit(h.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        body = None
        if method == "POST":
            body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))) or b"null")
        with self.lock:
            self.requests.append((method, url.path, query))
        parts = url.path.strip("/").split("/")
        try:
            if parts[:1] == ["apis"] and len(parts) in (6, 7) and parts[3] == "namespaces":
                return self.custom_object(h, method, (parts[1], parts[2], parts[5]), parts[4],
                                          parts[6] if len(parts) == 7 else None, body)
            if parts[:3] == ["api", "v1", "namespaces"] and method == "GET":
                ns = parts[3]
                if parts[4:] == ["pods"]:
                    return self.list_pods(h, ns, query.get("labelSelector", ""))
                if len(parts) == 7 and parts[4] == "pods" and parts[6] == "log":
                    return self.pod_log(h, ns, parts[5], query)
                if parts[4:] == ["events"]:
                    return self._send_json(h, 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {},
                                                    "items": [e for e in self.events
                                                              if e["metadata"]["namespace"] == ns]})
            self._send_json(h, 404, _status(404, "NotFound", "the server could not find the requested resource"))
        except (BrokenPipeError, ConnectionResetError):
            pass

    # --- custom objects

    def custom_object(self, h, method, gvr, ns, name, body):
        kind = self.CRDS.get(gvr)
        if kind is None:
            return self._send_json(h, 404, _status(404, "NotFound", "the server could not find the requested resource"))
        group, version, plural = gvr
        if method == "POST" and name is None:
            self.posted.append(copy.deepcopy(body))
            if body.get("apiVersion") != f"{group}/{version}" or body.get("kind") != kind:
                return self._send_json(h, 400, _status(400, "BadRequest", "the API version or kind in the data "
                                                                          "does not match the URL"))
            meta = body.get("metadata") or {}
            if meta.get("namespace", ns) != ns:
                return self._send_json(h, 400, _status(400, "BadRequest", "the namespace of the provided object "
                                                                          "does not match the namespace sent"))
            errors = crd_errors(kind, body)
            if errors or not meta.get("name"):
                return self._send_json(h, 422, _status(422, "Invalid", f"{kind} is invalid: {errors}"))
            key = (plural, ns, meta["name"])
            with self.lock:
                if key in self.objects:
                    return self._send_json(h, 409, _status(409, "AlreadyExists",
                                                           f'{plural}.{group} "{meta["name"]}" already exists'))
                obj = copy.deepcopy(body)
                obj["metadata"].update(namespace=ns, uid=f"uid-{len(self.objects)}", resourceVersion="1",
                                       generation=1, creationTimestamp=_now())
                self.objects[key] = obj
                self._controller_create(kind, obj)
            return self._send_json(h, 201, obj)
        if method == "GET" and name is not None:
            with self.lock:
                self.unavailable_gets -= 1
                if self.unavailable_gets >= 0:
                    return self._send_json(h, 503, _status(503, "ServiceUnavailable", "the server is shutting down"))
            obj = self.objects.get((plural, ns, name))
            if obj is None:
                return self._send_json(h, 404, _status(404, "NotFound", f'{plural}.{group} "{name}" not found'))
            return self._send_json(h, 200, obj)
        return self._send_json(h, 405, _status(405, "MethodNotAllowed", "not supported by this test server"))

    # --- the toy controller

    def _controller_create(self, kind, obj):
        name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
        if kind == "TrainJob":
            image = obj["spec"]["trainer"]["image"]
            for i in range(obj["spec"]["trainer"]["numNodes"]):
                labels = {tj.JOBSET_NAME_LABEL: name, tj.JOBSET_REPLICATED_JOB_LABEL: "node",
                          tj.JOBSET_JOB_INDEX_LABEL: "0", tj.COMPLETION_INDEX_KEY: str(i),
                          "batch.kubernetes.io/job-name": f"{name}-node-0",
                          "trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}
                self._add_pod(ns, f"{name}-node-0-{i}-x{i}k9z", labels, {tj.COMPLETION_INDEX_KEY: str(i)},
                              "node", image, i)
        else:
            specs = obj["spec"]["pytorchReplicaSpecs"]
            rank = 0
            for rtype in ("Master", "Worker"):
                for i in range((specs.get(rtype) or {}).get("replicas", 0)):
                    container = specs[rtype]["template"]["spec"]["containers"][0]
                    labels = {tj.V1_JOB_NAME_LABEL: name, tj.V1_REPLICA_TYPE_LABEL: rtype.lower(),
                              tj.V1_REPLICA_INDEX_LABEL: str(i), "training.kubeflow.org/operator-name":
                              "pytorchjob-controller"}
                    self._add_pod(ns, f"{name}-{rtype.lower()}-{i}", labels, {}, container["name"],
                                  container["image"], rank)
                    rank += 1
        obj["status"] = {"conditions": [{"type": "Created", "status": "True", "reason": "PyTorchJobCreated",
                                         "message": "created", "lastTransitionTime": _now()}]} \
            if kind == "PyTorchJob" else {}
        self._event(ns, kind, name, "Normal", "Created", f"Created {kind} {name}")
        self._event(ns, "Pod", f"{name}x-node-0-0-zzzzz", "Warning", "FailedMount", "unrelated pod of another job")

    def _add_pod(self, ns, pod_name, labels, annotations, container, image, rank):
        self.pods[(ns, pod_name)] = {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod_name, "namespace": ns, "labels": labels, "annotations": annotations,
                         "creationTimestamp": _now(), "uid": f"pod-{pod_name}"},
            "spec": {"containers": [{"name": container, "image": image}]},
            "status": {"phase": "Pending", "containerStatuses": [
                {"name": container, "image": image, "imageID": "", "ready": False, "restartCount": 0,
                 "state": {"waiting": {"reason": "ContainerCreating"}}}]},
            "_rank": rank,
        }
        self._event(ns, "Pod", pod_name, "Normal", "Scheduled", f"Successfully assigned {ns}/{pod_name} to gpu-node-{rank}")

    def _event(self, ns, kind, obj_name, typ, reason, message):
        stamp = _now()
        self.events.append({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{obj_name}.{len(self.events):08x}", "namespace": ns, "creationTimestamp": stamp},
            "involvedObject": {"kind": kind, "name": obj_name, "namespace": ns},
            "reason": reason, "message": message, "type": typ, "count": 1,
            "firstTimestamp": stamp, "lastTimestamp": stamp, "source": {"component": "test"},
        })

    def _public(self, pod):
        return {k: v for k, v in pod.items() if not k.startswith("_")}

    def list_pods(self, h, ns, selector):
        with self.lock:
            self.pod_lists += 1
            if self.pod_lists > self.pending_lists and not self.pods_never_start:
                for pod in self.pods.values():
                    if pod["status"]["phase"] == "Pending":
                        name = pod["spec"]["containers"][0]["name"]
                        pod["status"] = {"phase": "Running", "startTime": _now(), "containerStatuses": [
                            {"name": name, "image": pod["spec"]["containers"][0]["image"], "imageID": "sha256:1",
                             "ready": True, "restartCount": 0, "state": {"running": {"startedAt": _now()}}}]}
            items = [self._public(p) for (pod_ns, _), p in self.pods.items()
                     if pod_ns == ns and _selector_matches(selector, p["metadata"]["labels"])]
        self._send_json(h, 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "9"},
                                 "items": items})

    def pod_log(self, h, ns, pod_name, query):
        pod = self.pods.get((ns, pod_name))
        if pod is None:
            return self._send_json(h, 404, _status(404, "NotFound", f'pods "{pod_name}" not found'))
        container = query.get("container") or pod["spec"]["containers"][0]["name"]
        if container not in [c["name"] for c in pod["spec"]["containers"]]:
            return self._send_json(h, 400, _status(400, "BadRequest",
                                                   f"container {container} is not valid for pod {pod_name}"))
        if pod["status"]["phase"] == "Pending":
            return self._send_json(h, 400, _status(400, "BadRequest", f'container "{container}" in pod '
                                                   f'"{pod_name}" is waiting to start: ContainerCreating'))
        lines = self.logs.get(pod["_rank"], [])
        h.send_response(200)
        h.send_header("Content-Type", "text/plain")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        data = "".join(line + "\n" for line in lines).encode()
        pieces = [data[i:i + 7] for i in range(0, len(data), 7)]  # chunks that cut lines in the middle
        for piece in pieces:
            h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            h.wfile.flush()
            if _go_bool(query.get("follow")):
                time.sleep(0.01)  # a live stream, not one buffer
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
        if _go_bool(query.get("follow")):
            self._container_exits(ns, pod)

    def _container_exits(self, ns, pod):
        """The followed container ran to its end: finish the pods and the job as the scenario says."""
        with self.lock:
            for (plural, obj_ns, name), obj in self.objects.items():
                labels = pod["metadata"]["labels"]
                if obj_ns != ns or name not in (labels.get(tj.JOBSET_NAME_LABEL), labels.get(tj.V1_JOB_NAME_LABEL)):
                    continue
                if self.outcome == "hang":
                    return
                kind = self.CRDS[next(g for g in self.CRDS if g[2] == plural)]
                failed = self.outcome == "failed"
                for p in self.pods.values():
                    p["status"]["phase"] = "Failed" if failed else "Succeeded"
                if failed:
                    self._event(ns, "Pod", pod["metadata"]["name"], "Warning", "BackOff",
                                "Back-off restarting failed container: exit code 137 (OOMKilled)")
                    cond = {"type": "Failed", "status": "True", "reason": "FailedJobs",
                            "message": "jobset failed: job node-0 reached its backoff limit", "lastTransitionTime": _now()}
                else:
                    cond = {"type": "Complete" if kind == "TrainJob" else "Succeeded", "status": "True",
                            "reason": "AllJobsCompleted", "message": "jobset completed", "lastTransitionTime": _now()}
                obj.setdefault("status", {}).setdefault("conditions", []).append(cond)


@pytest.fixture
def cluster_factory():
    made = []

    def make(**kwargs) -> FakeCluster:
        made.append(FakeCluster(**kwargs))
        return made[-1]

    yield make
    for c in made:
        c.close()


def small_job(**changes) -> tj.DistributedJob:
    return replace(full_job(name="spo-train-spo-1a2b3c"), **changes)


def _run(cluster, job, kind="TrainJob", **kwargs):
    printed = []
    kwargs = {"poll_s": 0.02, "start_timeout_s": 10, "timeout_s": 20, **kwargs}
    result = tj.run_distributed_job(job, kind=kind, api_client=cluster.api_client(), out=printed.append, **kwargs)
    return result, printed


def test_run_trainjob_streams_node0_and_returns_on_complete(cluster_factory, monkeypatch):
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    cluster = cluster_factory(pending_lists=3)
    job = small_job()
    name, printed = _run(cluster, job)
    assert name == job.name
    assert cluster.posted == [tj.trainjob_manifest(job)]
    log_lines = [p for p in printed if not p.startswith("[trainjob]")]
    assert log_lines == cluster.logs[0]  # node 0's log, whole lines, in order; not node 1's
    assert any("waiting: node-0 pod" in p and "ContainerCreating" in p for p in printed)
    (log_request,) = [q for m, path, q in cluster.requests if path.endswith("/log")]
    assert _go_bool(log_request["follow"]) and log_request["container"] == "node"
    assert [path for m, path, _ in cluster.requests if m == "POST"] == [
        "/apis/trainer.kubeflow.org/v1alpha1/namespaces/kubeflow/trainjobs"]


def test_run_trainjob_failure_raises_with_message_and_events(cluster_factory, monkeypatch):
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    cluster = cluster_factory(outcome="failed")
    with pytest.raises(RuntimeError) as info:
        _run(cluster, small_job())
    text = str(info.value)
    assert "failed: FailedJobs: jobset failed: job node-0 reached its backoff limit" in text
    assert "BackOff: Back-off restarting failed container: exit code 137 (OOMKilled)" in text
    assert "Successfully assigned kubeflow/spo-train-spo-1a2b3c-node-0-1-x1k9z" in text
    assert "unrelated pod of another job" not in text


def test_kfp_retry_index_changes_the_name(cluster_factory, monkeypatch):
    monkeypatch.setenv("KFP_RETRY_INDEX", "1")
    cluster = cluster_factory()
    job = small_job()
    name, _ = _run(cluster, job)
    assert name == "spo-train-spo-1a2b3c-r1"
    assert [b["metadata"]["name"] for b in cluster.posted] == [name]
    assert cluster.posted[0] == tj.trainjob_manifest(replace(job, name=name))


def test_same_attempt_reuses_its_job_and_refuses_a_different_one(cluster_factory, monkeypatch):
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    cluster = cluster_factory()
    job = small_job()
    _run(cluster, job)
    name, printed = _run(cluster, job)  # a restarted launcher pod of the same attempt
    assert name == job.name and any("reusing" in p for p in printed)
    assert len(cluster.objects) == 1
    with pytest.raises(RuntimeError, match="already exists with a different spec"):
        _run(cluster, replace(job, num_nodes=3))


def test_timeouts(cluster_factory, monkeypatch):
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within 1s"):
        _run(cluster_factory(outcome="hang"), small_job(), timeout_s=1)
    assert 1 <= time.monotonic() - started < 2.5
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="node 0 did not start within 0.5s"):
        _run(cluster_factory(pods_never_start=True), small_job(), start_timeout_s=0.5)
    assert 0.5 <= time.monotonic() - started < 2


def test_run_pytorchjob(cluster_factory, monkeypatch):
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    cluster = cluster_factory(logs={0: ["master says hi"], 1: ["worker line"]})
    job = small_job(num_nodes=2)
    name, printed = _run(cluster, job, kind="PyTorchJob")
    assert name == job.name
    assert cluster.posted == [tj.pytorchjob_manifest(job)]
    assert [p for p in printed if not p.startswith("[trainjob]")] == ["master says hi"]
    (log_path,) = [(path, q) for m, path, q in cluster.requests if path.endswith("/log")]
    assert log_path[0] == "/api/v1/namespaces/kubeflow/pods/spo-train-spo-1a2b3c-master-0/log"
    assert log_path[1]["container"] == "pytorch"


def test_api_hiccups_while_waiting_are_retried(cluster_factory, monkeypatch):
    monkeypatch.delenv("KFP_RETRY_INDEX", raising=False)
    cluster = cluster_factory(unavailable_gets=3)
    name, printed = _run(cluster, small_job())
    assert name == small_job().name
    assert sum("unavailable (503); retrying" in p for p in printed) == 3
