"""Browser check: reports and MLflow's runs view rendered in headless Chromium (skipped without one)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import threading
from pathlib import Path

import pytest

from spo.evaluation import browser_check
from spo.evaluation.browser_check import PageCheck, check_mlflow_runs_view, check_page, find_chromium, main

needs_chromium = pytest.mark.skipif(
    find_chromium() is None,
    reason="no Chromium ($SPO_CHROMIUM, chromium, chromium-browser, google-chrome): run .ci/install_chromium")

PNG = b"\x89PNG\r\n\x1a\n"


def report_html(tmp_path: Path, models: list[str], extra: str = "") -> Path:
    """A report like the evaluation's: one column per model, its header cell marked data-model."""
    heads = "".join(f'<th data-model="{m}">{m}</th>' for m in models)
    path = tmp_path / "report.html"
    path.write_text(f"<!doctype html><html><body><h1>base vs spo</h1><table><tr><th>metric</th>{heads}</tr>"
                    f"<tr><td>aesthetic</td>{'<td>5.0</td>' * len(models)}</tr></table>{extra}</body></html>")
    return path


# ----------------------------------------------------------------------------------------------------
# no browser needed


def test_find_chromium_prefers_the_environment(tmp_path, monkeypatch):
    exe = tmp_path / "my-chrome"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("SPO_CHROMIUM", str(exe))
    assert find_chromium() == str(exe)
    monkeypatch.setenv("SPO_CHROMIUM", str(tmp_path / "absent"))
    assert find_chromium() is None


def test_page_check_ok_only_without_errors_and_missing():
    assert PageCheck("u", [], [], None).ok
    assert not PageCheck("u", ["console.error: x"], [], None).ok
    assert not PageCheck("u", [], ["text 'spo'"], None).ok


def test_only_the_documented_mlflow_message_is_benign():
    benign = ("network error: Failed to load resource: the server responded with a status of 404 (Not Found)"
              " (http://127.0.0.1:5123/ajax-api/2.0/mlflow/users/current)")
    assert browser_check._benign_mlflow_error(benign)
    assert not browser_check._benign_mlflow_error(benign.replace("users/current", "runs/search"))
    assert not browser_check._benign_mlflow_error(benign.replace("404 (Not Found)", "500 (Internal Server Error)"))


# ----------------------------------------------------------------------------------------------------
# reports


@pytest.mark.slow
@needs_chromium
def test_report_with_every_model_column_passes(tmp_path, capsys):
    path, shot = report_html(tmp_path, ["base", "spo"]), tmp_path / "shots" / "report.png"
    assert main(["report", str(path), "--expect-model", "base", "--expect-model", "spo", "--screenshot", str(shot)]) == 0
    assert capsys.readouterr().out.startswith(f"OK {path.as_uri()}")
    assert shot.read_bytes().startswith(PNG)


@pytest.mark.slow
@needs_chromium
def test_report_missing_a_model_column_fails_naming_it(tmp_path, capsys):
    path = report_html(tmp_path, ["base"])  # "spo" is in the title, but no column holds it; "dpo" is nowhere
    assert main(["report", str(path), *("--expect-model", "base", "--expect-model", "spo", "--expect-model", "dpo")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"FAIL {path.as_uri()}: 0 error(s), 3 missing", "  missing: text 'dpo'",
                     '  missing: selector th[data-model="spo"]', '  missing: selector th[data-model="dpo"]']


@pytest.mark.slow
@needs_chromium
def test_uncaught_exception_fails_the_page(tmp_path):
    path = report_html(tmp_path, ["base", "spo"], '<script>throw new Error("boom")</script>')
    check = check_page(path, expect_selectors=['th[data-model="spo"]'])
    assert not check.ok and check.missing == []
    assert len(check.errors) == 1 and "uncaught exception" in check.errors[0] and "boom" in check.errors[0]


@pytest.mark.slow
@needs_chromium
def test_console_error_and_failed_resource_fail_the_page(tmp_path):
    extra = '<img src="absent.png"><script>console.log("fine"); console.error("bad", 42)</script>'
    path = report_html(tmp_path, ["base", "spo"], extra)
    check = check_page(path, expect_texts=["base", "spo"])
    assert sorted(check.errors) == [f"console.error: bad 42 ({path.as_uri()}:1)",
                                    f"network error: Failed to load resource: net::ERR_FILE_NOT_FOUND"
                                    f" ({(tmp_path / 'absent.png').as_uri()})"]
    assert check.missing == []


@pytest.mark.slow
@needs_chromium
def test_a_report_that_does_not_load_fails(tmp_path):
    check = check_page(tmp_path / "absent.html", expect_texts=["base"])
    assert not check.ok and check.errors[0] == f"failed load: net::ERR_FILE_NOT_FOUND {(tmp_path / 'absent.html').as_uri()}"
    report_html(tmp_path, ["base", "spo"])
    with local_http_server(tmp_path) as base:
        absent = check_page(f"{base}/absent.html")  # an HTTP error status is a failed load too
        served = check_page(f"{base}/report.html", expect_selectors=['th[data-model="spo"]'])
    assert f"failed load: HTTP 404 File not found {base}/absent.html" in absent.errors
    assert served.ok, served.report()  # the /favicon.ico Chromium guesses for a page without an icon is no error


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def local_http_server(directory: Path):
    """A static file server of directory on a free local port; yields its base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# ----------------------------------------------------------------------------------------------------
# MLflow's UI


@pytest.mark.slow
@needs_chromium
def test_mlflow_runs_view_shows_the_model_runs_and_metrics(mlflow_db, tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri=mlflow_db)
    experiment_id = client.create_experiment("browser-check-exp", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, run_name="evaluate").info.run_id
    scorers = ("aesthetic", "clip", "hps", "pickscore", "spm")
    for model, score in (("base", 5.0), ("spo", 5.5)):
        child = client.create_run(experiment_id, run_name=model, tags={"mlflow.parentRunId": parent}).info.run_id
        client.log_batch(child, metrics=[Metric(m, score, 0, 0) for m in scorers], params=[Param("model", model)])
        client.set_terminated(child)
    # like evaluate's parent: 26 metric rows in all; the compare view's grid renders the first ~17 unscrolled
    summary = {f"win_rate.{m}{end}": 0.5 for m in scorers for end in ("", "_ci_low", "_ci_high")}
    summary.update({f"delta.{m}": 0.5 for m in scorers}, **{"win_rate.num_samples": 8.0})
    client.log_batch(parent, metrics=[Metric(k, v, 0, 0) for k, v in summary.items()])
    client.set_terminated(parent)

    shot = tmp_path / "mlflow.png"
    # "dpo" is no run; the experiment's name shows in the breadcrumbs, but in no cell of the compare view
    check = check_mlflow_runs_view(mlflow_db, "browser-check-exp", screenshot=shot, timeout_s=240,
                                   expect_texts=["evaluate", "base", "spo", "pickscore", "delta.aesthetic",
                                                 "win_rate.spm_ci_low", "dpo", "browser-check-exp"])
    assert check.url.endswith(f"/#/experiments/{experiment_id}/runs")
    assert check.errors == []
    assert check.missing == [f"text {t!r} (no such cell in the compare view of 3 runs)"
                             for t in ("dpo", "browser-check-exp")]
    assert shot.read_bytes().startswith(PNG)
    assert (tmp_path / "mlflow.runs.png").read_bytes().startswith(PNG)
