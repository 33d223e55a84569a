"""Run one training stage on several GPU nodes through Kubeflow Trainer (or the v1 Training Operator).

A KFP launcher component builds a `DistributedJob`, calls `run_distributed_job(job)` and waits: the job
is created as a plain custom object with the `kubernetes` client (no `kubeflow` SDK), the node-0 pod's
log is streamed into the launcher's log, and the job's conditions decide success or failure. This module
imports neither kfp nor the Kubeflow SDK; `kubernetes` is imported only by `run_distributed_job`.

Targets:
- Kubeflow Trainer v2, API `trainer.kubeflow.org/v1alpha1` `TrainJob` as served by Trainer 2.3 (checked
  against the CRD of tag v2.3.0). Pod customisation uses `spec.runtimePatches`, which replaced
  `podTemplateOverrides` in Trainer 2.2, so Trainer >= 2.2 is required. The referenced runtime
  (default the ClusterTrainingRuntime `torch-distributed`) must have a replicated job `node` whose
  container is named `node`, as the default runtimes do.
- v1 Training Operator 1.9 (`kubeflow.org/v1` `PyTorchJob`, checked against the CRD of tag v1.9.4) for
  clusters without Trainer v2: Master (1) + Worker (num_nodes - 1), container `pytorch`.

Each node runs `accelerate launch` with the rendezvous taken from the env the engine injects (Trainer:
PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT; v1: PET_NNODES, RANK, MASTER_ADDR,
MASTER_PORT); accelerate reads none of them by itself, so they become flags. Env for the `node`
container goes in `spec.trainer.env` (secrets as `valueFrom.secretKeyRef`): Trainer's webhook rejects
env in a runtime patch of the `node` container. Volumes, mounts, node selector and tolerations go in a
runtime patch. Pods restart never (`restartPolicy: Never` on v1; the runtime's JobSet failure policy on
v2): a failed node fails the job, and a KFP retry starts a new job (`-r<KFP_RETRY_INDEX>` in the name)
that resumes from the checkpoints on the shared volume.

RBAC for the launcher pod's ServiceAccount (`pipeline-runner` in standalone KFP, `default-editor` in a
multi-user profile); docs/kubeflow_rbac.yaml has it as manifests:
- TrainJob: in the job's namespace `trainjobs` (trainer.kubeflow.org) create/get/list/watch/delete/patch,
  `trainingruntimes` get/list/watch, core `pods`, `pods/log`, `events` get/list/watch; cluster-wide
  `clustertrainingruntimes` get/list/watch (a ClusterRole; a Role cannot grant a cluster-scoped kind).
  The Kubeflow-platform overlay of Trainer aggregates these into `kubeflow-edit`; a plain Trainer install
  and standalone KFP's `pipeline-runner` Role do not have them.
- PyTorchJob: `pytorchjobs` (kubeflow.org) create/get, `pods`, `pods/log` get/list; standalone KFP's
  `pipeline-runner` already has these, but not `events` (only the failure report uses them).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shlex
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, NamedTuple

TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL = "kubeflow.org", "v1", "pytorchjobs"
KINDS = ("TrainJob", "PyTorchJob")

# Trainer's default runtimes: replicated job `node`, container `node` (constants.Node in Trainer 2.3).
TRAINER_NODE = "node"
PYTORCH_CONTAINER = "pytorch"  # v1 requires this name for the training container
# The runtime patch's owner, as the Kubeflow SDK writes it (Trainer docs/operator-guides/runtime-patches.md).
RUNTIME_PATCH_MANAGER = "trainer.kubeflow.org/kubeflow-sdk"
# Set on every job: a retry of the same attempt (same name) finds its job and reuses it only if equal.
SPEC_HASH_ANNOTATION = "spo.pipeline/spec-sha256"

# Pod labels (JobSet v0.12 api/jobset/v1alpha2/jobset_types.go; Kubernetes Indexed Jobs; v1 common_types.go)
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOBSET_REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOBSET_JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_KEY = "batch.kubernetes.io/job-completion-index"  # label (k8s >= 1.28) and annotation
V1_JOB_NAME_LABEL = "training.kubeflow.org/job-name"
V1_REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
V1_REPLICA_INDEX_LABEL = "training.kubeflow.org/replica-index"

# Job conditions: Trainer TrainJob (Suspended, Complete, Failed); v1 (Created, Running, Restarting,
# Succeeded, Failed). A condition counts when its status is "True".
SUCCEEDED = {"TrainJob": "Complete", "PyTorchJob": "Succeeded"}
FAILED = "Failed"

# Trainer rejects a TrainJob that sets these in trainer.env (TorchRunReservedEnvNames); v1 sets them too.
RESERVED_ENV_PREFIX = "PET_"

NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")  # TrainJob CRD rule (RFC 1035 label), <= 63
NAME_MAX = 63
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUANTITY = re.compile(r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")


class SecretEnv(NamedTuple):
    """One env var read from a Kubernetes Secret at pod start: only the names travel, never the value."""

    secret_name: str
    key: str
    env_name: str


@dataclass(frozen=True)
class DistributedJob:
    """One training stage as a multi-node job. Invalid values raise ValueError naming the field."""

    name: str  # the job's name: ^[a-z]([-a-z0-9]*[a-z0-9])?$, at most 63 characters
    namespace: str
    image: str
    stage_argv: tuple[str, ...]  # `spo` arguments, e.g. ("train_spo", "--params", ".../params.yaml", ...)
    num_nodes: int
    gpus_per_node: int
    cpu: str | None = None  # per node; limits = requests
    memory: str | None = None  # per node; limits = requests (the /dev/shm volume counts against it)
    env: Mapping[str, str] = field(default_factory=dict)  # plain values (MLFLOW_TRACKING_URI, ...)
    secret_env: tuple[SecretEnv, ...] = ()  # -> valueFrom.secretKeyRef
    pvc_name: str | None = None  # a ReadWriteMany claim shared by all nodes (and the launcher)
    mount_path: str = "/mnt/spo"
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    runtime: str = "torch-distributed"  # TrainJob only: the runtime it references
    runtime_kind: str = "ClusterTrainingRuntime"  # or a namespaced "TrainingRuntime"
    shm_size: str = "64Gi"  # memory-backed emptyDir at /dev/shm (NCCL's shared-memory transport)
    active_deadline_s: int | None = None  # the job fails (DeadlineExceeded) after this long
    gpu_resource: str = "nvidia.com/gpu"

    def __post_init__(self) -> None:
        # normalise containers so equal specs give equal manifests (and hashes) whatever was passed in
        object.__setattr__(self, "stage_argv", tuple(self.stage_argv))
        object.__setattr__(self, "env", dict(self.env))
        object.__setattr__(self, "secret_env", tuple(SecretEnv(*s) for s in self.secret_env))
        object.__setattr__(self, "node_selector", dict(self.node_selector))
        object.__setattr__(self, "tolerations", tuple(dict(t) for t in self.tolerations))
        object.__setattr__(self, "labels", dict(self.labels))
        _validate(self)


def _bad(field_name: str, problem: str, value: Any) -> ValueError:
    return ValueError(f"DistributedJob.{field_name}: {problem}, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(job: DistributedJob) -> None:
    if not isinstance(job.name, str) or not NAME_RE.match(job.name) or len(job.name) > NAME_MAX:
        raise _bad("name", f"must match {NAME_RE.pattern} (lower-case letters, digits, '-'; starts with a letter) "
                           f"and be at most {NAME_MAX} characters", job.name)
    if not isinstance(job.namespace, str) or not _DNS1123_LABEL.match(job.namespace) or len(job.namespace) > 63:
        raise _bad("namespace", "must be a DNS-1123 label (the namespace the job runs in)", job.namespace)
    if not isinstance(job.image, str) or not job.image.strip() or any(c.isspace() for c in job.image):
        raise _bad("image", "must be a container image reference", job.image)
    if not job.stage_argv or not all(isinstance(a, str) for a in job.stage_argv):
        raise _bad("stage_argv", "must be a non-empty sequence of strings (the `spo` stage and its arguments)",
                   job.stage_argv)
    if not _is_int(job.num_nodes) or job.num_nodes < 1:
        raise _bad("num_nodes", "must be an integer >= 1", job.num_nodes)
    if not _is_int(job.gpus_per_node) or job.gpus_per_node < 1:
        raise _bad("gpus_per_node", "must be an integer >= 1 (accelerate starts one process per GPU)",
                   job.gpus_per_node)
    for name in ("cpu", "memory", "shm_size"):
        value = getattr(job, name)
        if value is None and name != "shm_size":
            continue
        if not isinstance(value, str) or not _QUANTITY.match(value) or value.startswith("-"):
            raise _bad(name, "must be a Kubernetes quantity string such as '32', '500m', '480Gi'", value)
    if job.cpu is not None and _cpu_cores(job.cpu) <= 0:
        raise _bad("cpu", "must be > 0", job.cpu)
    names = set()
    for env_name, value in job.env.items():
        if not isinstance(env_name, str) or not _ENV_NAME.match(env_name):
            raise _bad("env", f"{env_name!r} is not a valid env var name", dict(job.env))
        if not isinstance(value, str):
            raise _bad("env", f"{env_name}: values must be strings (use secret_env for credentials)", type(value))
        names.add(env_name)
    for entry in job.secret_env:
        if not all(isinstance(p, str) and p for p in entry):
            raise _bad("secret_env", "each entry is (secret_name, key, env_name), all non-empty strings", entry)
        if not _DNS1123_SUBDOMAIN.match(entry.secret_name) or len(entry.secret_name) > 253:
            raise _bad("secret_env", f"{entry.secret_name!r} is not a valid Secret name", entry)
        if not re.match(r"^[-._a-zA-Z0-9]+$", entry.key):
            raise _bad("secret_env", f"{entry.key!r} is not a valid Secret key", entry)
        if not _ENV_NAME.match(entry.env_name):
            raise _bad("secret_env", f"{entry.env_name!r} is not a valid env var name", entry)
        if entry.env_name in names:
            raise _bad("secret_env", f"{entry.env_name} is set twice (env or secret_env)", entry)
        names.add(entry.env_name)
    reserved = sorted(n for n in names if n.startswith(RESERVED_ENV_PREFIX))
    if reserved:
        raise _bad("env", f"{', '.join(reserved)}: PET_* variables are set by the training operator", reserved)
    if job.pvc_name is not None and (not isinstance(job.pvc_name, str) or not _DNS1123_SUBDOMAIN.match(job.pvc_name)):
        raise _bad("pvc_name", "must be a PersistentVolumeClaim name (DNS-1123 subdomain)", job.pvc_name)
    if not isinstance(job.mount_path, str) or not job.mount_path.startswith("/") or job.mount_path.rstrip("/") in (
            "", "/dev/shm"):
        raise _bad("mount_path", "must be an absolute path other than / and /dev/shm", job.mount_path)
    for label_name, label_value in [*job.node_selector.items(), *job.labels.items()]:
        which = "node_selector" if label_name in job.node_selector else "labels"
        if not _label_key_ok(label_name):
            raise _bad(which, f"{label_name!r} is not a valid label key", label_name)
        if not isinstance(label_value, str) or len(label_value) > 63 or not _LABEL_VALUE.match(label_value):
            raise _bad(which, f"{label_name}: {label_value!r} is not a valid label value (<= 63 characters)",
                       label_value)
    for toleration in job.tolerations:
        unknown = set(toleration) - {"key", "operator", "value", "effect", "tolerationSeconds"}
        if unknown:
            raise _bad("tolerations", f"unknown keys {sorted(unknown)} (Kubernetes Toleration fields: key, "
                                      "operator, value, effect, tolerationSeconds)", toleration)
        if toleration.get("operator", "Equal") not in ("Exists", "Equal"):
            raise _bad("tolerations", "operator must be Exists or Equal", toleration)
        if toleration.get("effect") not in (None, "NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise _bad("tolerations", "effect must be NoSchedule, PreferNoSchedule or NoExecute", toleration)
    if not isinstance(job.runtime, str) or not _DNS1123_SUBDOMAIN.match(job.runtime):
        raise _bad("runtime", "must name a (Cluster)TrainingRuntime", job.runtime)
    if job.runtime_kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
        raise _bad("runtime_kind", "must be ClusterTrainingRuntime or TrainingRuntime", job.runtime_kind)
    if job.active_deadline_s is not None and (not _is_int(job.active_deadline_s) or job.active_deadline_s < 1):
        raise _bad("active_deadline_s", "must be a positive integer (seconds) or None", job.active_deadline_s)
    if not isinstance(job.gpu_resource, str) or not _label_key_ok(job.gpu_resource) or "/" not in job.gpu_resource:
        raise _bad("gpu_resource", "must be an extended resource name such as nvidia.com/gpu", job.gpu_resource)


def _label_key_ok(key: Any) -> bool:
    if not isinstance(key, str) or not key:
        return False
    prefix, _, name = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _cpu_cores(quantity: str) -> float:
    """A CPU quantity in cores: '32' -> 32, '500m' -> 0.5, '1.5' -> 1.5 (k/M/... and exponents too)."""
    match = re.match(r"^\+?([0-9.]+)(.*)$", quantity)
    number, suffix = float(match.group(1)), match.group(2)
    scale = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
             "E": 1e18, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    if suffix in scale:
        return number * scale[suffix]
    return number * 10 ** float(suffix[1:])  # e/E exponent


# ----------------------------------------------------------------------------------------------------
# what each node runs


def omp_threads(job: DistributedJob) -> int | None:
    """CPU threads per training process: the node's CPUs shared by its GPU processes (None: no CPU limit
    given, so the node script divides `nproc` at run time)."""
    if job.cpu is None:
        return None
    return max(1, math.floor(_cpu_cores(job.cpu) / job.gpus_per_node))


def launch_script(job: DistributedJob, kind: str = "TrainJob") -> str:
    """The shell script every node runs: `accelerate launch ... -m spo.cli <stage argv>`, with the
    machine count, rank and rendezvous from the operator's env. POSIX sh; `set -u` names a missing one."""
    _check_kind(kind)
    if kind == "TrainJob":  # Trainer v2 sets only the PET_* variables
        nodes, rank, addr, port = "PET_NNODES", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"
    else:  # v1 PyTorchJob: PET_NNODES, RANK (= PET_NODE_RANK), MASTER_ADDR, MASTER_PORT
        nodes, rank, addr, port = "PET_NNODES", "RANK", "MASTER_ADDR", "MASTER_PORT"
    gpus = job.gpus_per_node
    flags = ["--multi_gpu"] if job.num_nodes * gpus >= 2 else []  # accelerate refuses --multi_gpu with 1 process
    flags += [
        "--num_machines", f'"${nodes}"',
        "--machine_rank", f'"${rank}"',
        "--main_process_ip", f'"${addr}"',
        "--main_process_port", f'"${port}"',
        "--num_processes", f'"$(({nodes} * {gpus}))"',  # the TOTAL over all machines
        "--num_cpu_threads_per_process", '"$OMP_NUM_THREADS"',
        # what configs/accelerate/one_node.yaml says, as flags: the stages do their own autocast and
        # gradient averaging, accelerate only starts the processes
        "--mixed_precision", "no", "--dynamo_backend", "no", "--rdzv_backend", "static", "--same_network",
        "--gpu_ids", "all",  # explicit: a default_config.yaml in the image would otherwise fill these in
    ]
    stage = " ".join(shlex.quote(a) for a in job.stage_argv)
    return "\n".join([
        "set -eu",
        'if [ -z "${OMP_NUM_THREADS:-}" ]; then',
        f"  OMP_NUM_THREADS=$(( $(nproc) / {gpus} )); [ \"$OMP_NUM_THREADS\" -ge 1 ] || OMP_NUM_THREADS=1",
        "  export OMP_NUM_THREADS",
        "fi",
        f"exec accelerate launch {' '.join(flags)} -m spo.cli {stage}",
    ])


def node_command(job: DistributedJob, kind: str = "TrainJob") -> list[str]:
    return ["/bin/sh", "-c", launch_script(job, kind)]


def _env(job: DistributedJob) -> list[dict]:
    plain = {"PYTHONUNBUFFERED": "1", "NCCL_DEBUG": "WARN"}
    threads = omp_threads(job)
    if threads is not None:
        plain["OMP_NUM_THREADS"] = str(threads)
    plain.update(job.env)  # the caller's values win
    entries = [{"name": k, "value": v} for k, v in plain.items()]
    entries += [{"name": s.env_name, "valueFrom": {"secretKeyRef": {"name": s.secret_name, "key": s.key}}}
                for s in job.secret_env]
    return entries


def _resources(job: DistributedJob) -> dict:
    amounts = {job.gpu_resource: str(job.gpus_per_node)}  # strings: a number would serialise as 8.0 elsewhere
    if job.cpu is not None:
        amounts["cpu"] = job.cpu
    if job.memory is not None:
        amounts["memory"] = job.memory
    return {"limits": dict(amounts), "requests": dict(amounts)}


def _volumes(job: DistributedJob) -> tuple[list[dict], list[dict]]:
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": job.shm_size}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if job.pvc_name:
        volumes.append({"name": "spo-data", "persistentVolumeClaim": {"claimName": job.pvc_name}})
        mounts.append({"name": "spo-data", "mountPath": job.mount_path})
    return volumes, mounts


def _scheduling(job: DistributedJob) -> dict:
    spec: dict[str, Any] = {}
    if job.node_selector:
        spec["nodeSelector"] = dict(job.node_selector)
    if job.tolerations:
        spec["tolerations"] = [{k: v for k, v in t.items() if v is not None} for t in job.tolerations]
    return spec


def _metadata(job: DistributedJob) -> dict:
    meta: dict[str, Any] = {"name": job.name, "namespace": job.namespace}
    if job.labels:
        meta["labels"] = dict(job.labels)
    return meta


def _with_hash(manifest: dict) -> dict:
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    manifest["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: digest}
    return manifest


# ----------------------------------------------------------------------------------------------------
# the custom objects


def trainjob_manifest(job: DistributedJob) -> dict:
    """The Trainer v2 `TrainJob` (trainer.kubeflow.org/v1alpha1, Trainer >= 2.2) for `job`."""
    volumes, mounts = _volumes(job)
    pod_spec = {**_scheduling(job), "volumes": volumes, "containers": [{"name": TRAINER_NODE, "volumeMounts": mounts}]}
    pod_template: dict[str, Any] = {"spec": pod_spec}
    if job.labels:
        pod_template["metadata"] = {"labels": dict(job.labels)}
    spec: dict[str, Any] = {
        "runtimeRef": {"name": job.runtime, "apiGroup": TRAINJOB_GROUP, "kind": job.runtime_kind},
        "trainer": {
            "image": job.image,
            "command": node_command(job, "TrainJob"),
            "numNodes": job.num_nodes,
            "env": _env(job),
            "resourcesPerNode": _resources(job),
        },
        "runtimePatches": [{
            "manager": RUNTIME_PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [
                {"name": TRAINER_NODE, "template": {"spec": {"template": pod_template}}}]}}},
        }],
    }
    if job.active_deadline_s is not None:
        spec["activeDeadlineSeconds"] = job.active_deadline_s
    return _with_hash({"apiVersion": f"{TRAINJOB_GROUP}/{TRAINJOB_VERSION}", "kind": "TrainJob",
                       "metadata": _metadata(job), "spec": spec})


def pytorchjob_manifest(job: DistributedJob) -> dict:
    """The v1 `PyTorchJob` (kubeflow.org/v1, Training Operator 1.9): Master 1 + Worker num_nodes - 1."""
    volumes, mounts = _volumes(job)
    container = {"name": PYTORCH_CONTAINER, "image": job.image, "command": node_command(job, "PyTorchJob"),
                 "env": _env(job), "resources": _resources(job), "volumeMounts": mounts}
    template: dict[str, Any] = {"spec": {**_scheduling(job), "volumes": volumes, "containers": [container]}}
    if job.labels:
        template["metadata"] = {"labels": dict(job.labels)}

    def replica(count: int) -> dict:
        # Never: a failed node fails the job at once (static rendezvous cannot take one restarted node)
        return {"replicas": count, "restartPolicy": "Never", "template": json.loads(json.dumps(template))}

    replicas = {"Master": replica(1)}
    if job.num_nodes > 1:
        replicas["Worker"] = replica(job.num_nodes - 1)
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None"}  # keep pods (and their logs) after the end
    if job.active_deadline_s is not None:
        run_policy["activeDeadlineSeconds"] = job.active_deadline_s
    return _with_hash({"apiVersion": f"{PYTORCHJOB_GROUP}/{PYTORCHJOB_VERSION}", "kind": "PyTorchJob",
                       "metadata": _metadata(job), "spec": {"runPolicy": run_policy, "pytorchReplicaSpecs": replicas}})


def manifest(job: DistributedJob, kind: str = "TrainJob") -> dict:
    _check_kind(kind)
    return trainjob_manifest(job) if kind == "TrainJob" else pytorchjob_manifest(job)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind: must be one of {', '.join(KINDS)}, got {kind!r}")


def attempt_name(name: str, retry_index: str | None = None) -> str:
    """`name` with `-r<KFP_RETRY_INDEX>` folded in (trimmed to 63 characters) when the variable is set,
    so a KFP retry creates a new job instead of hitting AlreadyExists."""
    index = os.environ.get("KFP_RETRY_INDEX") if retry_index is None else retry_index
    if index is None or str(index).strip() == "":
        return name
    index = str(index).strip()
    if not index.isdigit():
        raise ValueError(f"KFP_RETRY_INDEX: expected a non-negative integer, got {index!r}")
    suffix = f"-r{int(index)}"
    return name[: NAME_MAX - len(suffix)].rstrip("-") + suffix


def in_cluster_namespace(default: str = "kubeflow") -> str:
    """The namespace of the pod this runs in (its ServiceAccount mount), else `default`."""
    try:
        with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
            return f.read().strip() or default
    except OSError:
        return default


# ----------------------------------------------------------------------------------------------------
# create, follow, wait


def _api_client(api_client):
    if api_client is not None:
        return api_client
    from kubernetes import client, config

    try:
        config.load_incluster_config()  # in a pod: the ServiceAccount token
    except config.ConfigException:
        config.load_kube_config()  # elsewhere: ~/.kube/config (or $KUBECONFIG)
    return client.ApiClient()


def _transient(err: BaseException) -> bool:
    """An API error worth retrying: throttling, a server hiccup, a dropped connection."""
    import urllib3
    from kubernetes.client.rest import ApiException

    if isinstance(err, ApiException):
        return err.status in (429, 500, 502, 503, 504)
    return isinstance(err, (urllib3.exceptions.HTTPError, ConnectionError))


def _coordinates(kind: str) -> tuple[str, str, str]:
    if kind == "TrainJob":
        return TRAINJOB_GROUP, TRAINJOB_VERSION, TRAINJOB_PLURAL
    return PYTORCHJOB_GROUP, PYTORCHJOB_VERSION, PYTORCHJOB_PLURAL


def _node0_selector(kind: str, name: str) -> str:
    if kind == "TrainJob":
        return f"{JOBSET_NAME_LABEL}={name},{JOBSET_REPLICATED_JOB_LABEL}={TRAINER_NODE},{JOBSET_JOB_INDEX_LABEL}=0"
    return f"{V1_JOB_NAME_LABEL}={name},{V1_REPLICA_TYPE_LABEL}=master,{V1_REPLICA_INDEX_LABEL}=0"


def _pick_node0(kind: str, pods: list) -> Any | None:
    """The newest rank-0 pod (a JobSet restart makes a new one); for a TrainJob completion index 0."""
    def completion_index(pod) -> str | None:
        meta = pod.metadata
        return (meta.labels or {}).get(COMPLETION_INDEX_KEY) or (meta.annotations or {}).get(COMPLETION_INDEX_KEY)

    if kind == "TrainJob":
        pods = [p for p in pods if completion_index(p) in ("0", None)]
    if not pods:
        return None
    return max(pods, key=lambda p: (p.metadata.creation_timestamp is not None, p.metadata.creation_timestamp or 0))


def _condition(obj: dict, kind: str) -> tuple[str | None, dict | None]:
    """("succeeded" | "failed" | "suspended" | None, the condition)."""
    conditions = [c for c in ((obj.get("status") or {}).get("conditions") or []) if c.get("status") == "True"]
    for cond in conditions:
        if cond.get("type") == FAILED:
            return "failed", cond
    for cond in conditions:
        if cond.get("type") == SUCCEEDED[kind]:
            return "succeeded", cond
    for cond in conditions:
        if cond.get("type") == "Suspended":
            return "suspended", cond
    return None, None


def job_events(core, namespace: str, name: str, limit: int = 20) -> list[str]:
    """The last `limit` events of the job and of the objects it made (pods, Jobs, JobSet: names `<name>`
    or `<name>-...`), oldest first, one line each."""
    try:
        events = core.list_namespaced_event(namespace).items or []
    except Exception as err:  # noqa: BLE001 - the report must not hide the failure it reports
        return [f"(events unavailable: {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''})"]
    mine = [e for e in events if e.involved_object is not None and e.involved_object.name is not None
            and (e.involved_object.name == name or e.involved_object.name.startswith(name + "-"))]

    def when(e):
        stamp = e.last_timestamp or e.event_time or e.first_timestamp or e.metadata.creation_timestamp
        return stamp.timestamp() if stamp is not None else 0.0

    lines = []
    for e in sorted(mine, key=when)[-limit:]:
        stamp = e.last_timestamp or e.event_time or e.first_timestamp
        lines.append(f"{stamp.isoformat() if stamp else '-'} {e.type or ''} {e.involved_object.kind or ''}/"
                     f"{e.involved_object.name}: {e.reason or ''}: {e.message or ''}".strip())
    return lines


class _LogFollower(threading.Thread):
    """Streams one container's log (follow=true) line by line to `out` until the container ends."""

    def __init__(self, core, namespace: str, pod: str, container: str, out: Callable[[str], Any]):
        super().__init__(name=f"logs-{pod}", daemon=True)
        self.core, self.namespace, self.pod, self.container, self.out = core, namespace, pod, container, out
        self.response = None
        self.stopped = False

    def run(self) -> None:
        try:
            self.response = self.core.read_namespaced_pod_log(self.pod, self.namespace, container=self.container,
                                                              follow=True, _preload_content=False)
            pending = b""
            for chunk in self.response.stream(4096, decode_content=True):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.out(line.decode("utf-8", "replace").rstrip("\r"))
            if pending:
                self.out(pending.decode("utf-8", "replace").rstrip("\r"))
        except Exception as err:  # noqa: BLE001 - a broken log stream must not fail the job
            if not self.stopped:
                self.out(f"[trainjob] log stream of {self.pod} ended: {err.__class__.__name__}: {err}")
        finally:
            if self.response is not None:
                self.response.release_conn()

    def stop(self) -> None:
        self.stopped = True
        if self.response is not None:
            try:
                self.response.close()
            except Exception:  # noqa: BLE001
                pass


def run_distributed_job(job: DistributedJob, kind: str = "TrainJob", api_client=None, timeout_s: float = 7 * 24 * 3600,
                        poll_s: float = 30, start_timeout_s: float = 3600, out: Callable[[str], Any] = print,
                        log_grace_s: float = 60) -> str:
    """Create the job (TrainJob or PyTorchJob), stream its node-0 log to `out`, wait for the end.

    Returns the job's name on success. Raises RuntimeError (with the failed condition's message and the
    job's last events) when it fails, TimeoutError when node 0 has not left Pending after
    `start_timeout_s` or the job has not finished after `timeout_s` (both from creation; the job is left
    as it is). The name gets `-r<KFP_RETRY_INDEX>` when that is set; an existing job of that name with
    the same spec (a restarted launcher of the same attempt) is reused, a different one is an error.
    """
    _check_kind(kind)
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    job = replace(job, name=attempt_name(job.name))
    body = manifest(job, kind)
    api = _api_client(api_client)
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    group, version, plural = _coordinates(kind)
    name, namespace = job.name, job.namespace
    selector = _node0_selector(kind, name)
    container = TRAINER_NODE if kind == "TrainJob" else PYTORCH_CONTAINER
    started = time.monotonic()

    def fail(message: str, error=RuntimeError):
        events = job_events(core, namespace, name)
        return error(message + ("\nlast events:\n  " + "\n  ".join(events) if events else "\n(no events)"))

    try:
        custom.create_namespaced_custom_object(group, version, namespace, plural, body)
        out(f"[trainjob] created {kind} {namespace}/{name} ({job.num_nodes} nodes x {job.gpus_per_node} GPUs)")
    except ApiException as err:
        if err.status == 409:
            existing = custom.get_namespaced_custom_object(group, version, namespace, plural, name)
            theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(SPEC_HASH_ANNOTATION)
            if theirs != body["metadata"]["annotations"][SPEC_HASH_ANNOTATION]:
                raise RuntimeError(f"{kind} {namespace}/{name} already exists with a different spec; delete it "
                                   f"(kubectl delete {plural}.{group} -n {namespace} {name}) or rename the job") from None
            out(f"[trainjob] reusing {kind} {namespace}/{name}, created earlier by this attempt")
        elif err.status == 403:
            raise RuntimeError(f"not allowed to create {plural}.{group} in {namespace}: the launcher's "
                               f"ServiceAccount needs the RBAC in docs/kubeflow_rbac.yaml ({err.reason})") from None
        elif err.status == 404:
            raise RuntimeError(f"{plural}.{group}/{version} is not served by this cluster: is "
                               + ("Kubeflow Trainer >= 2.2" if kind == "TrainJob" else "the Training Operator 1.9")
                               + " installed?") from None
        else:
            raise

    # a transient API error while waiting is retried (until the deadlines): giving up would leave a
    # running job behind and make the KFP retry start a second one
    def status() -> tuple[str | None, dict | None]:
        try:
            obj = custom.get_namespaced_custom_object(group, version, namespace, plural, name)
        except Exception as err:
            if isinstance(err, ApiException) and err.status == 404:
                raise fail(f"{kind} {namespace}/{name} was deleted while running") from None
            if not _transient(err):
                raise
            out(f"[trainjob] status of {name} unavailable ({getattr(err, 'status', None) or type(err).__name__});"
                " retrying")
            return None, None
        return _condition(obj, kind)

    def node0_pod():
        try:
            return _pick_node0(kind, core.list_namespaced_pod(namespace, label_selector=selector).items or [])
        except Exception as err:
            if not _transient(err):
                raise
            out(f"[trainjob] pods of {name} unavailable ({getattr(err, 'status', None) or type(err).__name__});"
                " retrying")
            return None

    def raise_failed(cond: dict):
        raise fail(f"{kind} {namespace}/{name} failed: {cond.get('reason') or 'Failed'}: {cond.get('message') or ''}")

    # 1. wait for node 0 to leave Pending (queueing, scheduling, image pull), or for the job to end
    last_note = None
    while True:
        state, cond = status()
        pod = node0_pod()
        phase = pod.status.phase if pod is not None and pod.status is not None else None
        started_pod = pod is not None and phase not in (None, "", "Pending")
        if started_pod or state in ("failed", "succeeded"):
            break
        if state == "suspended":
            note = f"{kind} suspended ({(cond or {}).get('reason') or 'queued'})"
        else:
            statuses = (pod.status.container_statuses or []) if pod is not None and pod.status is not None else []
            waiting = [cs.state.waiting.reason for cs in statuses if cs.state and cs.state.waiting]
            note = (f"node-0 pod {pod.metadata.name}: " + (", ".join(w for w in waiting if w) or "Pending")
                    if pod is not None else "node-0 pod not created yet")
        if note != last_note:
            out(f"[trainjob] waiting: {note}")
            last_note = note
        if time.monotonic() - started > min(start_timeout_s, timeout_s):
            raise fail(f"{kind} {namespace}/{name}: node 0 did not start within {min(start_timeout_s, timeout_s):g}s "
                       f"(last seen: {note})", TimeoutError)
        time.sleep(poll_s)

    # 2. follow node 0's log while polling the job's conditions
    follower = None
    if started_pod:  # a Pending pod's log request is refused (container waiting to start)
        out(f"[trainjob] node 0 is {phase}: following pod {pod.metadata.name}")
        follower = _LogFollower(core, namespace, pod.metadata.name, container, out)
        follower.start()
    try:
        while state != "succeeded":
            if state == "failed":
                if follower is not None:
                    follower.join(min(log_grace_s, 5.0))  # the last lines usually say why
                raise_failed(cond)
            if time.monotonic() - started > timeout_s:
                raise fail(f"{kind} {namespace}/{name} did not finish within {timeout_s:g}s; it is still there "
                           f"(kubectl delete {plural}.{group} -n {namespace} {name})", TimeoutError)
            time.sleep(poll_s)
            state, cond = status()
        if follower is not None:
            follower.join(log_grace_s)  # the container has ended, so the stream ends: take its last lines
    finally:
        if follower is not None and follower.is_alive():
            follower.stop()
    out(f"[trainjob] {kind} {namespace}/{name} {SUCCEEDED[kind].lower()}")
    return name
