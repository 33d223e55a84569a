"""`spo pipeline submit` against a loopback Kubeflow Pipelines API server (no mocks of kfp.Client).

FakeKFP serves the v2beta1 endpoints kfp.Client 2.17 uses, answering as KFP's API server does: grpc-gateway
JSON with proto field names (experiment_id, display_name, ...), unpopulated fields left out (no experiments
is `{}`), errors as google.rpc.Status, mounted under /pipeline as behind a Kubeflow dashboard. It records every
request, so a test can say what was sent and that nothing was sent.
"""

import json
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from conftest import REPO_ROOT

pytest.importorskip("kfp")
import kfp  # noqa: E402

from pipelines import cli  # noqa: E402
from pipelines import submit as submit_module  # noqa: E402
from pipelines.submit import run_url  # noqa: E402

PARAMS = REPO_ROOT / "params.yaml"
MLFLOW = "cluster.mlflow_tracking_uri=http://mlflow.mlflow.svc.cluster.local:5000"  # compile refuses a config without
PREFIX = "/pipeline"  # where a Kubeflow dashboard serves the KFP API (and UI)
EXPERIMENTS, RUNS = "/pipeline/apis/v2beta1/experiments", "/pipeline/apis/v2beta1/runs"
HEALTHZ = "/pipeline/apis/v2beta1/healthz"
TOKEN = "kfp-token-7f3a9c"
NOW = "2026-12-02T14:00:00Z"


@dataclass
class Request:
    method: str
    path: str
    query: dict
    headers: dict  # lower-case names
    body: object


class FakeKFP:
    """KFP's API server, as far as submit goes. multi_user: namespaces are required and filtered on;
    token: every request needs `authorization: Bearer <token>`; login_page: every API call is redirected to
    a login page that answers 200 with HTML (Dex / oauth2-proxy in front of an unauthenticated client);
    delay_s: every answer comes that late."""

    def __init__(self, *, multi_user=False, token=None, login_page=False, delay_s=0.0):
        self.multi_user, self.token, self.login_page, self.delay_s = multi_user, token, login_page, delay_s
        self.experiments, self.runs, self.requests = [], [], []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                fake._serve(self, "GET")

            def do_POST(self):
                fake._serve(self, "POST")

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_port}"
        self.host = self.root + PREFIX
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def add_experiment(self, name, namespace=""):
        experiment = {"experiment_id": str(uuid.uuid4()), "display_name": name, "created_at": NOW,
                      "storage_state": "AVAILABLE", "last_run_created_at": "1970-01-01T00:00:00Z"}
        if namespace:
            experiment["namespace"] = namespace
        self.experiments.append(experiment)
        return experiment

    def _serve(self, handler, method):
        url = urlsplit(handler.path)
        raw = handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        request = Request(method, url.path, {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()},
                          {k.lower(): v for k, v in handler.headers.items()}, json.loads(raw) if raw else None)
        self.requests.append(request)
        time.sleep(self.delay_s)
        status, answer, headers = *self._answer(request), {}
        if status == 302:
            status, headers, answer = 302, {"Location": "/dex/auth?client_id=kubeflow-oidc-authservice"}, ""
        data = answer.encode() if isinstance(answer, str) else json.dumps(answer).encode()
        try:
            handler.send_response(status)
            for key, value in headers.items():
                handler.send_header(key, value)
            handler.send_header("Content-Type", "text/html" if isinstance(answer, str) else "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (delay_s)
            pass

    def _answer(self, r):
        if r.path.startswith("/dex/"):
            return 200, "<!DOCTYPE html><html><body><form>Log in to Your Account</form></body></html>"
        if not r.path.startswith(PREFIX + "/apis/"):
            return 404, "404 page not found\n"
        if self.login_page:
            return 302, ""
        if self.token and r.headers.get("authorization") != f"Bearer {self.token}":
            return 401, {"code": 16, "message": "Failed to authorize with API: Failed to authenticate token review",
                         "details": []}
        route = (r.method, r.path)
        if route == ("GET", HEALTHZ):
            return 200, {"commit_sha": "unknown", "tag_name": "2.5.0", "multi_user": self.multi_user,
                         "pipeline_store": "database"}
        namespace = r.query.get("namespace", "") if r.method == "GET" else (r.body or {}).get("namespace", "")
        if self.multi_user and not namespace and r.path == EXPERIMENTS:
            return 400, {"code": 3, "message": "Invalid input error: In multi-user mode, experiments need a namespace",
                         "details": []}
        if route == ("GET", EXPERIMENTS):
            predicates = json.loads(r.query.get("filter") or '{"predicates": []}')["predicates"]
            if any(p["operation"] not in (1, "EQUALS") or p["key"] != "display_name" for p in predicates):
                return 400, {"code": 3, "message": "Invalid input error: unsupported filter", "details": []}
            found = [e for e in self.experiments
                     if (not self.multi_user or e.get("namespace") == namespace)
                     and all(e["display_name"] == p["stringValue"] for p in predicates)]
            return 200, {"experiments": found, "total_size": len(found)} if found else {}
        if route == ("POST", EXPERIMENTS):
            return 200, self.add_experiment(r.body["display_name"], namespace if self.multi_user else "")
        if route == ("POST", RUNS):
            if not any(e["experiment_id"] == r.body.get("experiment_id") for e in self.experiments):
                return 404, {"code": 5, "message": "Experiment not found", "details": []}
            run = {**r.body, "run_id": str(uuid.uuid4()), "storage_state": "AVAILABLE", "state": "PENDING",
                   "service_account": "pipeline-runner", "created_at": NOW, "scheduled_at": NOW,
                   "finished_at": "1970-01-01T00:00:00Z"}
            self.runs.append(run)
            return 200, run
        return 404, {"code": 5, "message": "Not Found", "details": []}


@pytest.fixture(autouse=True)
def hermetic_kfp(tmp_path, monkeypatch):
    """No kfp context file or pod files of this machine, no KFP variables from the shell."""
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    monkeypatch.setattr(kfp.Client, "_NAMESPACE_PATH", str(tmp_path / "pod" / "namespace"))
    for var in ("KFP_TOKEN", "KFP_NAMESPACE", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT",
                "KF_PIPELINES_SA_TOKEN_PATH", "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
                "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME", "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def kfp_server():
    servers = []

    def start(**options):
        servers.append(FakeKFP(**options))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The package, compiled once, for the tests that pass --package."""
    path = tmp_path_factory.mktemp("package") / "spo_pipeline.yaml"
    return cli.compile_pipeline(path, cli.params_yaml(PARAMS, None, [MLFLOW]))


def submit(capsys, *args):
    code = cli.main(["submit", "--params", str(PARAMS), "-S", MLFLOW, *args])
    out, err = capsys.readouterr()
    return code, out, err


def routes(server):
    return [(r.method, r.path) for r in server.requests]


def pipeline_spec(run_body):
    """The inline spec of a run request: kfp sends {pipeline_spec, platform_spec} when there is a platform spec."""
    spec = run_body["pipeline_spec"]
    return spec["pipeline_spec"] if "platform_spec" in spec else spec


def task_caching(spec):
    """{(DAG owner, task): caching on?} over the root DAG and every component's DAG."""
    owners = {"root": spec["root"], **spec.get("components", {})}
    return {(owner, name): bool(task.get("cachingOptions", {}).get("enableCache"))
            for owner, body in owners.items() for name, task in body.get("dag", {}).get("tasks", {}).items()}


def one_line(err):
    return err.count("\n") == 1 and err.startswith("spo pipeline submit: ") and "Traceback" not in err


def test_submit_compiles_creates_the_experiment_and_starts_a_run(kfp_server, capsys, monkeypatch):
    server = kfp_server(multi_user=True, token=TOKEN)
    monkeypatch.setenv("KFP_TOKEN", TOKEN)
    code, out, err = submit(capsys, "--host", server.host, "--namespace", "team-a", "--experiment", "spo-sweep",
                            "--run-name", "beta-5", "-S", "train_spo.beta=5.0")
    assert code == 0, err
    assert routes(server) == [("GET", EXPERIMENTS), ("POST", EXPERIMENTS), ("POST", RUNS)]  # namespace known: no healthz
    listed, created, started = server.requests
    assert listed.query["namespace"] == "team-a"
    assert [(p["key"], p["stringValue"]) for p in json.loads(listed.query["filter"])["predicates"]] == [
        ("display_name", "spo-sweep")]
    assert created.body == {"display_name": "spo-sweep", "namespace": "team-a"}
    assert started.body["experiment_id"] == server.experiments[0]["experiment_id"]
    assert started.body["display_name"] == "beta-5"
    assert pipeline_spec(started.body)["pipelineInfo"]["name"] == "spo-pipeline"  # compiled now, sent inline
    config = yaml.safe_load(started.body["runtime_config"]["parameters"]["params_yaml"])
    assert config["train_spo"]["beta"] == 5.0 and config["cluster"]["mlflow_tracking_uri"].startswith("http://mlflow")
    run_id = server.runs[0]["run_id"]
    assert out == f"submitted run {run_id} to experiment spo-sweep: {server.host}/#/runs/details/{run_id}\n"
    assert err == ""  # none of kfp's own prints or warnings
    assert {r.headers.get("authorization") for r in server.requests} == {f"Bearer {TOKEN}"}


def test_submit_reuses_the_experiment_of_its_namespace(kfp_server, capsys, monkeypatch, package):
    server = kfp_server(multi_user=True)
    server.add_experiment("spo", "team-a")
    mine = server.add_experiment("spo", "team-b")
    monkeypatch.setenv("KFP_NAMESPACE", "team-b")
    code, out, err = submit(capsys, "--host", server.host, "--package", str(package))
    assert code == 0, err
    assert routes(server) == [("GET", EXPERIMENTS), ("POST", RUNS)]
    assert server.requests[0].query["namespace"] == "team-b"
    assert server.requests[1].body["experiment_id"] == mine["experiment_id"]
    assert "authorization" not in server.requests[0].headers  # no KFP_TOKEN: --auth none
    assert f" to experiment spo: {server.host}/#/runs/details/" in out


def test_caching_stays_as_compiled_unless_no_cache(kfp_server, capsys, package):
    server = kfp_server()
    assert submit(capsys, "--host", server.host, "--package", str(package))[0] == 0
    assert submit(capsys, "--host", server.host, "--package", str(package), "--no-cache")[0] == 0
    default, no_cache = (task_caching(pipeline_spec(r.body)) for r in server.requests if r.path == RUNS)
    compiled = task_caching(next(yaml.safe_load_all(package.read_text())))
    assert set(compiled.values()) == {True, False}  # the stages cached, the MLflow steps not
    assert {owner for owner, _ in compiled} - {"root"}  # stages in a nested DAG (the exit handler's)
    assert default == compiled
    assert no_cache.keys() == compiled.keys() and set(no_cache.values()) == {False}


def test_printed_link_uses_the_ui_url(kfp_server, capsys, package):
    assert run_url("https://kubeflow.example.com/pipeline", "r-1") == "https://kubeflow.example.com/pipeline/#/runs/details/r-1"
    server = kfp_server()
    code, out, err = submit(capsys, "--host", server.host + "/", "--package", str(package),
                            "--ui-url", "https://kubeflow.example.com/pipeline/")
    assert code == 0, err
    assert out.endswith(f": https://kubeflow.example.com/pipeline/#/runs/details/{server.runs[0]['run_id']}\n")


def test_in_cluster_auth_sends_the_service_account_token(kfp_server, capsys, monkeypatch, tmp_path, package):
    server = kfp_server(token="sa-token-from-the-pod")
    (tmp_path / "token").write_text("sa-token-from-the-pod\n")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setenv("KFP_TOKEN", TOKEN)  # not this one
    code, out, err = submit(capsys, "--host", server.host, "--package", str(package), "--auth", "in-cluster")
    assert code == 0, err
    assert {r.headers.get("authorization") for r in server.requests} == {"Bearer sa-token-from-the-pod"}
    assert "sa-token-from-the-pod" not in out + err


def test_missing_token_and_401s_are_one_line(kfp_server, capsys, monkeypatch, package):
    server = kfp_server(token=TOKEN)
    code, out, err = submit(capsys, "--host", server.host, "--package", str(package), "--auth", "token")
    assert (code, out, server.requests) == (2, "", []) and one_line(err) and "KFP_TOKEN" in err

    code, out, err = submit(capsys, "--host", server.host, "--package", str(package))
    assert code == 1 and out == "" and one_line(err), err
    assert f"{server.host} answered 401 Unauthorized" in err and "set KFP_TOKEN" in err
    assert routes(server) == [("GET", HEALTHZ)]  # one attempt, not kfp's five, 5 s apart

    monkeypatch.setenv("KFP_TOKEN", "stale-token-91c2")
    code, out, err = submit(capsys, "--host", server.host, "--package", str(package))
    assert code == 1 and one_line(err) and "KFP_TOKEN was refused" in err
    assert server.requests[-1].headers["authorization"] == "Bearer stale-token-91c2"
    assert "stale-token-91c2" not in out + err


def test_unreachable_host_is_one_line(capsys, caplog, package):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{sock.getsockname()[1]}/pipeline"  # closed again: nothing listens there
    code, out, err = submit(capsys, "--host", host, "--package", str(package))
    assert code == 1 and out == "" and one_line(err), err
    assert err.startswith(f"spo pipeline submit: cannot reach {host}: Failed to establish a new connection: ")
    assert "refused" in err.lower()  # and not urllib3's "HTTPConnection(host=..., port=...)" in front
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no urllib3 "Retrying ..." lines


def test_a_server_that_does_not_answer_times_out(kfp_server, capsys, monkeypatch, package):
    monkeypatch.setattr(submit_module, "TIMEOUT_S", (1, 0.3))  # kfp.Client itself would wait for good
    server = kfp_server(delay_s=2)
    code, out, err = submit(capsys, "--host", server.host, "--package", str(package))
    assert code == 1 and out == "" and one_line(err), err
    assert f"cannot reach {server.host}: " in err and "Read timed out" in err


def test_wrong_path_and_login_page_are_one_line(kfp_server, capsys, package):
    server = kfp_server()
    code, out, err = submit(capsys, "--host", server.root, "--package", str(package))  # without /pipeline
    assert code == 1 and one_line(err), err
    assert f"{server.root} answered 404 Not Found" in err and "--host" in err

    login = kfp_server(login_page=True)
    code, out, err = submit(capsys, "--host", login.host, "--package", str(package))
    assert code == 1 and out == "" and one_line(err), err
    assert "did not answer like the Kubeflow Pipelines API" in err


def test_multi_user_server_needs_a_namespace(kfp_server, capsys, package):
    server = kfp_server(multi_user=True)
    code, out, err = submit(capsys, "--host", server.host, "--package", str(package))
    assert code == 2 and one_line(err) and "--namespace" in err and "KFP_NAMESPACE" in err
    assert routes(server) == [("GET", HEALTHZ)]


def test_config_and_package_errors_stop_before_any_request(kfp_server, capsys, tmp_path):
    server = kfp_server()
    code, out, err = submit(capsys, "--host", server.host, "-S", "train_spo.betta=1")
    assert code == 2 and "train_spo.betta" in err
    code, out, err = submit(capsys, "--host", server.host, "-S", "cluster.mlflow_tracking_uri=null")  # compile refuses
    assert code == 2 and one_line(err) and "cluster.mlflow_tracking_uri" in err
    (tmp_path / "notes.yaml").write_text("- not a pipeline\n")
    code, out, err = submit(capsys, "--host", server.host, "--package", str(tmp_path / "notes.yaml"))
    assert code == 2 and one_line(err) and "not a pipeline package" in err
    assert server.requests == []


def test_a_package_without_params_runs_its_own_config_with_the_overrides(kfp_server, capsys, package):
    """`--package P -S k=v`: the config P was compiled with, plus the overrides (not params.yaml's)."""
    server = kfp_server()
    code = cli.main(["submit", "--host", server.host, "--package", str(package), "-S", "train_spo.beta=5.0"])
    assert code == 0, capsys.readouterr().err
    [started] = [r for r in server.requests if r.path == RUNS]
    config = yaml.safe_load(started.body["runtime_config"]["parameters"]["params_yaml"])
    compiled = cli.package_params(package)
    assert config["train_spo"]["beta"] == 5.0 and compiled["train_spo"]["beta"] == 10.0
    assert config["cluster"] == compiled["cluster"] and config["cluster"]["mlflow_tracking_uri"].startswith("http")
