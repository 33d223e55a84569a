"""Start a run of a compiled pipeline package on a Kubeflow Pipelines server (`spo pipeline submit`).

kfp.Client (2.17) makes these KFP v2beta1 REST calls, each with `authorization: Bearer <token>` when there is one:
  GET  /apis/v2beta1/healthz                  only while the namespace is unknown: is the server multi-user?
  GET  /apis/v2beta1/experiments?filter=...&namespace=NS   the experiment by display_name (EQUALS)
  POST /apis/v2beta1/experiments              {display_name, namespace}, when none matched
  POST /apis/v2beta1/runs                     {experiment_id, display_name, pipeline_spec (inline), runtime_config}
Around it: one healthz attempt instead of kfp's five 5 s apart, a timeout on every request (kfp sets none),
nothing written to ~/.config/kfp, none of kfp's own prints, and every failure as one SubmitError line that
never contains the token.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import kfp
import kfp_server_api
import urllib3
import yaml
from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

TOKEN_ENV = "KFP_TOKEN"  # the bearer token, from the environment only: never an argument, never printed
NAMESPACE_ENV = "KFP_NAMESPACE"
UI_ENV = "KF_PIPELINES_UI_ENDPOINT"  # kfp.Client's own variable for the UI's address
AUTH_MODES = ("token", "in-cluster", "none")
TIMEOUT_S = (10, 120)  # connect, read: kfp.Client passes none, so a dropped connection would hang for good


@dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    experiment_id: str
    url: str


class SubmitError(Exception):
    """One line for the user. exit_code 2: fix the command or the environment; 1: the server refused or is
    unreachable."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_url(base: str, run_id: str) -> str:
    """The run in the KFP UI: a dashboard's https://kubeflow.example.com/pipeline gives
    https://kubeflow.example.com/pipeline/#/runs/details/<id> (what kfp.Client prints, from its ui_host)."""
    return f"{base.rstrip('/')}/#/runs/details/{run_id}"


def submit_run(host: str, package_path: str | Path, arguments: dict, *, experiment: str, run_name: str | None,
               namespace: str | None, auth: str | None, enable_caching: bool | None,
               ui_url: str | None = None) -> SubmittedRun:
    """Start a run of the package in `experiment` (created when missing) and return its id and UI link.

    namespace: the Kubeflow profile namespace (multi-user KFP), default $KFP_NAMESPACE. auth: "token"
    ($KFP_TOKEN), "in-cluster" (this pod's projected ServiceAccount token), "none"; None: token when KFP_TOKEN
    is set, else none. enable_caching: None keeps the compiled settings (the MLflow steps stay uncached),
    False turns caching off for every task. Raises SubmitError."""
    if not re.match(r"https?://[^/]", host):
        raise SubmitError(f"--host must be an http:// or https:// URL, got {host!r}", 2)
    host = host.rstrip("/")
    package = Path(package_path)
    docs = _read_package(package)
    namespace = namespace or os.environ.get(NAMESPACE_ENV) or None
    client_kwargs, secret = _auth(auth)
    with tempfile.TemporaryDirectory() as tmp:
        if enable_caching is False:
            package = _without_cache(docs, Path(tmp) / package.name)
        try:
            with _quiet():
                client = _Client(host=host, namespace=namespace or "kubeflow", **client_kwargs)
                _add_timeout(client._run_api.api_client.rest_client)
                if not namespace and client.healthz and client.healthz.multi_user and not client.get_user_namespace():
                    raise SubmitError(f"{host} is a multi-user Kubeflow Pipelines: set --namespace or {NAMESPACE_ENV} "
                                      "(your Kubeflow profile's namespace)", 2)
                result = client.create_run_from_pipeline_package(
                    str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
                    namespace=namespace, enable_caching=enable_caching)
        except kfp_server_api.ApiException as err:
            raise SubmitError(_scrub(_refusal(err, host, auth, namespace), secret)) from None
        except urllib3.exceptions.HTTPError as err:
            raise SubmitError(_scrub(f"cannot reach {host}: {_reason(err)}", secret)) from None
        except (ValueError, OSError) as err:  # kfp: two experiments of that name, an unreadable package or token
            raise SubmitError(_scrub(f"{host}: {_one_line(str(err))}", secret)) from None
    run = result.run_info
    if not run.run_id:  # e.g. a login page answered 200 with HTML: kfp then returns empty models
        raise SubmitError(f"{host} did not answer like the Kubeflow Pipelines API (a login page? check --host and "
                          f"--auth / {TOKEN_ENV})")
    return SubmittedRun(run_id=run.run_id, experiment_id=run.experiment_id,
                        url=run_url(ui_url or os.environ.get(UI_ENV) or host, run.run_id))


class _Client(kfp.Client):
    """kfp.Client with one healthz attempt (kfp retries 5 times, 5 s apart, even on a 401) under a timeout, and
    a namespace found in the pod kept in memory (kfp writes it to ~/.config/kfp/context.json)."""

    healthz = None

    def get_kfp_healthz(self, sleep_duration: int = 5):
        _add_timeout(self._healthz_api.api_client.rest_client)
        self.healthz = self._healthz_api.healthz_service_get_healthz()
        return self.healthz

    def set_user_namespace(self, namespace: str) -> None:
        self._context_setting["namespace"] = namespace


@contextlib.contextmanager
def _quiet():
    """Without kfp's prints (its own links), its warnings, and urllib3's "Retrying ..." log lines: the caller
    prints one line."""
    urllib3_log = logging.getLogger("urllib3.connectionpool")  # kfp_server_api resets the parent's level
    root = logging.getLogger()  # kfp logs "Creating experiment ..." on the root logger, shown once configured
    levels = urllib3_log.level, root.level
    urllib3_log.setLevel(logging.ERROR)
    root.setLevel(max(root.level, logging.WARNING))
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        urllib3_log.setLevel(levels[0])
        root.setLevel(levels[1])


def _add_timeout(rest) -> None:
    """Every request through this kfp_server_api REST client gets TIMEOUT_S unless the caller passed one."""
    if getattr(rest, "_spo_timeout", False):
        return
    request = rest.request

    def request_with_timeout(*args, _request_timeout=None, **kwargs):
        return request(*args, _request_timeout=_request_timeout or TIMEOUT_S, **kwargs)

    rest.request, rest._spo_timeout = request_with_timeout, True


def _auth(mode: str | None) -> tuple[dict, str | None]:
    """kfp.Client keyword arguments for the auth mode, and the secret to keep out of messages."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    mode = mode or ("token" if token else "none")
    if mode == "token":
        if not token:
            raise SubmitError(f"--auth token: set {TOKEN_ENV} to a bearer token for the Kubeflow Pipelines API", 2)
        return {"existing_token": token}, token
    if mode == "in-cluster":
        path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
        try:
            secret = Path(path).read_text().strip()
        except OSError as err:
            raise SubmitError(f"--auth in-cluster: no ServiceAccount token at {path} ({err.strerror}); project one "
                              "with audience pipelines.kubeflow.org there, or set the path in "
                              f"{KF_PIPELINES_SA_TOKEN_ENV}", 2) from None
        return {"credentials": ServiceAccountTokenVolumeCredentials(path)}, secret
    if mode == "none":
        return {}, None
    raise SubmitError(f"--auth must be one of {', '.join(AUTH_MODES)}, got {mode!r}", 2)


def _read_package(package: Path) -> list:
    """The package's YAML documents (pipeline spec, then platform spec), checked before any request."""
    try:
        if package.suffix not in (".yaml", ".yml"):
            raise ValueError("a .yaml file from `spo pipeline compile`")
        docs = list(yaml.safe_load_all(package.read_text()))
        if not docs or not isinstance(docs[0], dict) or not isinstance(docs[0].get("root"), dict):
            raise ValueError("no pipeline spec in it")
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise SubmitError(f"{package}: not a pipeline package ({_one_line(str(err))})", 2) from None
    return docs


def _without_cache(docs: list, out: Path) -> Path:
    """The package with caching off on every task of every DAG, written to `out`. kfp's enable_caching=False
    reaches only the root DAG's tasks, and this pipeline's stages sit in its exit handler's DAG."""
    spec = docs[0]
    for dag_owner in [spec["root"], *(spec.get("components") or {}).values()]:
        for task in ((dag_owner.get("dag") or {}).get("tasks") or {}).values():
            task.setdefault("cachingOptions", {})["enableCache"] = False
    out.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return out


def _refusal(err: kfp_server_api.ApiException, host: str, auth: str | None, namespace: str | None) -> str:
    if not err.status:  # kfp_server_api's own wrapping of a TLS error
        return f"cannot reach {host}: {_one_line(str(err.reason))}"
    try:
        phrase = HTTPStatus(err.status).phrase
    except ValueError:
        phrase = err.reason or ""
    said = _server_message(err.body)
    line = f"{host} answered {err.status} {phrase}" + (f" ({said})" if said else "")
    token_set = bool(os.environ.get(TOKEN_ENV, "").strip())
    if err.status == 401:
        if auth == "in-cluster":
            return f"{line}: the pod's ServiceAccount token was refused (audience pipelines.kubeflow.org?)"
        if token_set and auth in (None, "token"):
            return f"{line}: the token in {TOKEN_ENV} was refused (expired?)"
        return f"{line}: set {TOKEN_ENV} (a bearer token for the Kubeflow Pipelines API)"
    if err.status == 403:
        where = f"namespace {namespace}" if namespace else f"this namespace (--namespace / {NAMESPACE_ENV})"
        return f"{line}: the identity behind the token may not use {where}"
    if err.status == 404:
        return f"{line}: is --host the Kubeflow Pipelines API endpoint (e.g. https://kubeflow.example.com/pipeline)?"
    return line


def _server_message(body) -> str:
    """The API server's google.rpc.Status message, or the start of a plain-text / HTML body."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    if not body:
        return ""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        body = str(data.get("message") or data.get("error") or "")
    elif body.lstrip().startswith("<"):
        return ""  # an HTML page (a proxy's or a login page): its text says nothing useful on one line
    return _one_line(body)[:200]


def _reason(err: urllib3.exceptions.HTTPError) -> str:
    """urllib3's cause without the connection it names: 'Failed to establish a new connection: [Errno 111] ...'."""
    cause = getattr(err, "reason", None) or err
    return re.sub(r"^(<[^<>]* object at 0x[0-9a-f]+>|HTTPS?Connection\([^()]*\)):\s*", "", _one_line(str(cause)))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text
