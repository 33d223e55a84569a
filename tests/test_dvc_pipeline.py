"""dvc.yaml: stage names, deps that cover the code each stage imports, params per section, and
(slow) `dvc repro` in a throwaway copy of the repo: full run, no-op rerun, partial rerun on a param change."""

import ast
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO_ROOT, tiny_digits_params

from spo.config import Config
from spo.stages import STAGES

DVC = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
SECTIONS = set(Config.__dataclass_fields__)
# Sections a stage reads that shape none of its outputs, so they are no stage's params (renaming the
# MLflow experiment must not rerun the pipeline).
NOT_OUTPUT_SHAPING_SECTIONS = {"tracking", "cluster"}  # cluster: KFP's compile-time pod settings
# Plumbing a stage imports that cannot change its outputs: logging, the command line, atomic writes, where
# the profiles are found.
NOT_OUTPUT_SHAPING = {"spo/__init__.py", "spo/tracking/__init__.py", "spo/tracking/tracker.py", "spo/tracking/mlflow_tracker.py",
                      "spo/tracking/progress.py", "spo/atomic_write.py", "spo/asset_paths.py",
                      "spo/stages/__init__.py", "spo/stages/stage_cli.py"}


def module_file(name: str) -> Path | None:
    path = REPO_ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def spo_closure(module: str) -> set[Path]:
    """Every spo/ source file `module` imports, transitively (lazy imports in functions included)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        path = module_file(todo.pop())
        if path is None or path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name == "spo" or name.startswith("spo."):
                    parts = name.split(".")
                    todo += [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return seen


def docstring_only(files: set[str]) -> set[str]:
    """Package `__init__.py` files that hold nothing but a docstring: they cannot shape an output."""
    def empty(rel: str) -> bool:
        body = ast.parse((REPO_ROOT / rel).read_text()).body
        return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)
    return {f for f in files if f.endswith("__init__.py") and empty(f)}


def sections_read(files: set[Path]) -> set[str]:
    """Config sections accessed as `cfg.<section>` anywhere in `files`."""
    found = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cfg"
                    and node.attr in SECTIONS):
                found.add(node.attr)
    return found


def existing_stage(stage: str) -> None:
    if not (REPO_ROOT / "spo" / "stages" / f"{stage}.py").is_file():
        pytest.skip(f"stage module spo/stages/{stage}.py not written yet")


def test_stage_names_and_commands():
    assert list(DVC) == list(STAGES)
    for stage, spec in DVC.items():
        assert spec["cmd"].startswith(f"python -m spo.cli {stage} ")


@pytest.mark.parametrize("stage", STAGES)
def test_deps_cover_the_code_the_stage_imports(stage):
    existing_stage(stage)
    deps = [d for d in DVC[stage]["deps"] if d.startswith("spo/")]
    files = {str(p.relative_to(REPO_ROOT)) for p in spo_closure(f"spo.stages.{stage}")}
    uncovered = sorted(f for f in files - NOT_OUTPUT_SHAPING - docstring_only(files)
                       if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))
    assert not uncovered, f"add to dvc.yaml stages.{stage}.deps: {uncovered}"
    assert f"spo/stages/{stage}.py" in deps


@pytest.mark.parametrize("stage", STAGES)
def test_params_list_every_section_the_stage_reads(stage):
    existing_stage(stage)
    params = DVC[stage]["params"]
    # other stage modules a stage imports helpers from are not run: their `cfg.<section>` reads don't count
    others = {REPO_ROOT / "spo/stages" / f"{s}.py" for s in STAGES if s != stage}
    read = sections_read(spo_closure(f"spo.stages.{stage}") - others - {REPO_ROOT / "spo/tracking/mlflow_tracker.py"})
    missing = sorted(s for s in read - NOT_OUTPUT_SHAPING_SECTIONS
                     if not any(p == s or p.startswith(s + ".") for p in params))
    assert not missing, f"add to dvc.yaml stages.{stage}.params: {missing}"
    assert not {p.split(".")[0] for p in params} & NOT_OUTPUT_SHAPING_SECTIONS, f"stages.{stage}.params"
    own = {p.split(".")[0] for p in params} - {"profile", "seed", "torch_threads", "model", stage}
    earlier = set(STAGES[:STAGES.index(stage)])
    assert own & set(STAGES) <= earlier  # e.g. register reads evaluate's models and CIs; no stage lists a later stage's knobs


def test_paths_in_commands_match_outs():
    """Each stage writes under the --out-dir its cmd names; training waits for the validation report."""
    for stage, spec in DVC.items():
        out_dir = re.search(r"--out-dir (\S+)", spec["cmd"]).group(1)
        declared = spec.get("outs", []) + spec.get("metrics", []) + spec.get("plots", [])
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in declared]
        assert outs and all(o.startswith(out_dir + "/") for o in outs), stage
    assert "reports/validate/quarantine.parquet" in DVC["train_spm"]["deps"]


def test_training_curves_are_one_plot_of_a_declared_output():
    """history.csv is an out of train_spo (cache: false: in git) and plotted once, by the top-level plot."""
    dvc_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    assert not [s for s, spec in DVC.items() if "plots" in spec]  # a stage-level plot would show it twice
    assert {"models/spo/history.csv": {"cache": False}} in DVC["train_spo"]["outs"]
    (plot,) = [p["SPO training"] for p in dvc_yaml["plots"] if "SPO training" in p]
    assert plot["x"] == "step"
    assert plot["y"] == {"models/spo/history.csv": ["loss", "ratio_win", "ratio_lose", "kept_pair_rate"]}
    # the learning curve puts both methods on one axis of training seconds
    (curve,) = [p["Learning curve"] for p in dvc_yaml["plots"] if "Learning curve" in p]
    assert curve["x"] == "train_seconds" and curve["y"] == {"models/spo/curve.csv": "score", "models/dpo/curve.csv": "score"}
    for stage in ("train_spo", "train_dpo"):
        assert {f"models/{stage[6:]}/curve.csv": {"cache": False}} in DVC[stage]["outs"]


# ----------------------------------------------------------------------------------------------------
# end to end, in a copy of the repo


def copy_repo(dest: Path) -> Path:
    """Tracked + untracked-not-ignored files, without any outputs a developer may have produced."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\n")
    skip = ("data/", "models/", "reports/", "outputs/", "mlruns/", "mlflow.db", "dvc.lock", ".dvc/")
    for rel in filter(None, listed):
        if rel.startswith(skip) or not (REPO_ROOT / rel).is_file():
            continue
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, dest / rel)
    return dest


def sh(args: list[str], cwd: Path, env: dict) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([a-z_]+)'", output)


@pytest.fixture
def repo_copy(tmp_path):
    for stage in STAGES:
        existing_stage(stage)
    repo = copy_repo(tmp_path / "repo")
    (repo / "params.yaml").write_text(yaml.safe_dump(tiny_digits_params(), sort_keys=False))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    env.pop("SPO_PARENT_RUN_ID", None)
    sh(["git", "init", "-q"], repo, env)
    sh(["dvc", "init", "-q"], repo, env)
    sh(["dvc", "config", "core.analytics", "false"], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "fresh clone"], repo, env)
    return repo, env


@pytest.mark.slow
def test_dvc_repro_full_noop_and_experiment(repo_copy):
    """Full run, no-op rerun, then `dvc exp run --temp` with one knob changed: only the downstream stages
    rerun, and its MLflow runs land in the repository's default store (not in DVC's throwaway copy)."""
    repo, env = repo_copy
    env = {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}  # the default store: <repo>/mlflow.db
    first = sh(["dvc", "repro"], repo, env)
    assert stages_run(first) == list(STAGES)
    assert json.loads((repo / "models/spo/metrics.json").read_text())["optimizer_steps"] > 0
    assert json.loads((repo / "models/dpo/metrics.json").read_text())["optimizer_steps"] == 2
    for out in ("data/prepared/pairs/train-00000.parquet", "reports/validate/quarantine.parquet", "models/spm/model",
                "models/spo/lora/pytorch_lora_weights.safetensors", "models/dpo/lora/pytorch_lora_weights.safetensors",
                "models/spo/history.csv", "models/spo/curve.csv", "models/dpo/history.csv", "models/dpo/curve.csv",
                "reports/evaluate/metrics.json", "models/registered/registration.json"):
        assert (repo / out).exists(), out

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("spo-digits").experiment_id
    runs = client.search_runs([experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # one dvc repro = one parent run
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id) \
        == sorted(STAGES)
    # the headline numbers sit on the pipeline run itself: two pipeline runs line up in the runs table
    headline = parents[0].data.metrics
    assert {"base.oracle_utility", "spo.oracle_utility", "dpo.oracle_utility", "win_rate.spo_vs_base.oracle_aesthetic",
            "win_rate.dpo_vs_base.oracle_aesthetic"} <= set(headline)
    evaluation = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    assert headline["spo.oracle_utility"] == evaluation["models"]["spo"]["oracle_utility"]
    assert "spo" in (repo / "reports/evaluate/report.html").read_text()
    registration = json.loads((repo / "models/registered/registration.json").read_text())
    assert registration["registered"]["spo"]["gate"]["reason"] == "first"  # then DPO is gated against it
    assert set(registration["registered"]) == {"spo", "dpo"} and registration["champion_version"] in ("1", "2")

    # locks and temp dirs beside the outputs are neither untracked files for git nor changes for DVC
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "dvc repro"], repo, env)
    tracked = sh(["git", "ls-files"], repo, env).split()
    assert not [p for p in tracked if re.search(r"(^|/)\.[^/]+\.(lock|tmp-|old-)", p)]
    assert (repo / "models/.spo.lock").is_file() and (repo / "models/spo/.gitignore").is_file()
    second = sh(["dvc", "repro"], repo, env)
    assert stages_run(second) == []
    assert "data and pipelines are up to date" in second.lower() or "didn't change" in second
    assert "up to date" in sh(["dvc", "status"], repo, env).lower()
    assert sh(["git", "status", "--porcelain"], repo, env) == ""
    assert not (repo / "models/spm_checkpoints").exists() or not list((repo / "models/spm_checkpoints").iterdir())

    # DVC versions the data and the models: push them to a local remote, lose them, pull them back
    sh(["dvc", "remote", "add", "-d", "local", str(repo.parent / "dvc-remote")], repo, env)
    assert "pushed" in sh(["dvc", "push"], repo, env)
    shard = repo / "data/prepared/pairs/train-00000.parquet"
    before = shard.read_bytes()
    shutil.rmtree(repo / "data/prepared/pairs")  # (metrics.json is cache: false, in git: it stays)
    shutil.rmtree(repo / ".dvc/cache")
    sh(["dvc", "pull"], repo, env)
    assert shard.read_bytes() == before
    assert "up to date" in sh(["dvc", "status"], repo, env).lower()

    lora = (repo / "models/spo/lora/pytorch_lora_weights.safetensors").read_bytes()
    # `-S` makes DVC rewrite params.yaml with its YAML 1.2 dumper: every value must read back the same
    # under our YAML 1.1 loader (a bare `no` would turn into False)
    third = sh(["dvc", "exp", "run", "--temp", "-S", "train_spo.beta=5.0"], repo, env)
    assert stages_run(third) == ["train_spo", "evaluate", "register"]  # a new adapter: downstream reruns
    runs = client.search_runs([experiment_id])
    assert not [r for r in runs if r.info.status == "RUNNING"]
    (parent,) = [r for r in runs if "spo.dvc_experiment" in r.data.tags and r.info.run_name.startswith("pipeline")]
    name = parent.data.tags["spo.dvc_experiment"]
    assert parent.info.run_name == f"pipeline-{name}" and parent.data.params["train_spo.beta"] == "5.0"
    nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(nested) == ["evaluate", "register", "train_spo"]
    gate = nested["register"].data.params["register.spo.gate"]  # compared with the first run's champion
    assert gate in ("better", "not_better"), gate
    assert nested["train_spo"].data.params["train_spo.beta"] == "5.0"
    assert nested["train_spo"].data.tags["spo.dvc_experiment"] == name
    assert not list((repo / ".dvc" / "tmp").rglob("mlflow.db"))

    sh(["dvc", "exp", "apply", name], repo, env)
    assert (repo / "models/spo/lora/pytorch_lora_weights.safetensors").read_bytes() != lora
