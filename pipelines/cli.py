"""`spo pipeline compile | submit | run-local`: the Kubeflow side of the project.

The config is baked into the run as one YAML string: from `--params FILE` (default params.yaml) or
`--profile NAME` (profiles/NAME.yaml), plus DVC-style `-S key=value` overrides, validated first so a
typo fails here, naming the key, not on the cluster. Credentials come from the environment only:
KFP_TOKEN (bearer token) and KFP_NAMESPACE; kfp.Client also reads its usual env/kube config.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import yaml

from spo.config import (
    ConfigError,
    apply_overrides,
    check_implemented,
    config_from_dict,
    profile_path,
    read_params,
)

DEFAULT_PACKAGE = "spo_pipeline.yaml"


def package_params(package: Path) -> dict:
    """The config a compiled package was built with (its `params_yaml` default)."""
    try:
        spec = next(yaml.safe_load_all(Path(package).read_text()))
        return yaml.safe_load(spec["root"]["inputDefinitions"]["parameters"]["params_yaml"]["defaultValue"])
    except (OSError, yaml.YAMLError, StopIteration, KeyError, TypeError) as err:
        raise ConfigError(f"--package {package}: not a compiled spo pipeline ({type(err).__name__}: {err})") from None


def params_yaml(params: Path | None, profile: str | None, overrides: list[str], package: Path | None = None) -> str:
    """The validated config as one line of YAML (what the pipeline's `params_yaml` parameter receives):
    from --profile, --params, else a --package's own config, else params.yaml; then the overrides.
    Bad input (file, YAML, key, value, or a profile that cannot run yet) is a ConfigError naming it."""
    if package is not None and not (params or profile):
        path, raw = package, package_params(package)
    else:
        path = profile_path(profile) if profile else (params or Path("params.yaml"))
        raw = read_params(path)
    data = apply_overrides(raw, overrides)
    try:
        cfg = config_from_dict(data, require_implemented=False)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    check_implemented(cfg)
    # one line: kfp 2.17 copies defaults into the package's header comment verbatim, so a newline in a
    # default breaks the YAML (kubeflow/pipelines#10438). Flow style keeps floats YAML-safe (6.0e-05).
    return yaml.safe_dump(data, default_flow_style=True, width=float("inf"), sort_keys=False).strip()


def compile_pipeline(output: Path, config_text: str, image: str | None = None) -> Path:
    """Write the pipeline package for a cluster: pod settings from the config's `cluster` section, the
    image from `image` or cluster.image. Refuses a config without an MLflow server (ConfigError)."""
    from kfp import compiler

    from pipelines.spo_pipeline import build_pipeline

    cluster = config_from_dict(yaml.safe_load(config_text), require_implemented=False).cluster
    if not cluster.mlflow_tracking_uri:
        raise ConfigError("cluster.mlflow_tracking_uri: required to compile for a cluster (each pod would "
                          "otherwise write to a sqlite file of its own); e.g. "
                          "-S cluster.mlflow_tracking_uri=http://mlflow.mlflow.svc.cluster.local:5000")
    compiler.Compiler().compile(build_pipeline(cluster, image), str(output),
                                pipeline_parameters={"params_yaml": config_text})
    return output


def submit(args: argparse.Namespace, config_text: str) -> int:
    """Compile (unless --package is given), start a run (pipelines/submit.py) and print its UI link."""
    from pipelines.submit import SubmitError, submit_run

    with tempfile.TemporaryDirectory() as tmp:
        try:
            package = args.package or compile_pipeline(Path(tmp) / DEFAULT_PACKAGE, config_text, args.image)
            run = submit_run(args.host, package, {"params_yaml": config_text}, experiment=args.experiment,
                             run_name=args.run_name, namespace=args.namespace, auth=args.auth,
                             enable_caching=False if args.no_cache else None, ui_url=args.ui_url)
        except (ConfigError, SubmitError) as err:
            print(f"spo pipeline submit: {err}", file=sys.stderr)
            return getattr(err, "exit_code", 2)
    print(f"submitted run {run.run_id} to experiment {args.experiment}: {run.url}")
    return 0


def run_local(pipeline_root: Path, config_text: str) -> dict[str, str]:
    """Run the whole DAG in subprocesses of this environment (kfp.local; GPU requests are ignored)."""
    import uuid

    from kfp import local

    from pipelines.spo_pipeline import build_pipeline
    from spo.stages.stage_cli import CHECKPOINT_ROOT_ENV
    from spo.tracking.mlflow_tracker import KFP_RUN_ENV

    cluster = config_from_dict(yaml.safe_load(config_text), require_implemented=False).cluster
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    # what a cluster's pods get from their label and the PVC: this run's id, a checkpoint root
    os.environ[KFP_RUN_ENV] = f"local-{uuid.uuid4().hex[:12]}"
    os.environ[CHECKPOINT_ROOT_ENV] = os.environ.get(CHECKPOINT_ROOT_ENV) or str(Path(pipeline_root).absolute() / "checkpoints")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    build_pipeline(cluster, on_cluster=False)(params_yaml=config_text)
    return {"pipeline_root": str(pipeline_root), "mlflow": os.environ["MLFLOW_TRACKING_URI"],
            "kfp_run_id": os.environ[KFP_RUN_ENV]}


def build_parser() -> argparse.ArgumentParser:
    config = argparse.ArgumentParser(add_help=False)
    source = config.add_mutually_exclusive_group()
    source.add_argument("--params", type=Path, help="params file (default: params.yaml)")
    source.add_argument("--profile", help="use profiles/NAME.yaml")
    config.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a param, e.g. -S train_spo.beta=5.0")
    parser = argparse.ArgumentParser(prog="spo pipeline", description="Compile, submit or locally run the SPO pipeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    comp = sub.add_parser("compile", parents=[config], help="write the pipeline package (YAML)")
    comp.add_argument("--output", type=Path, default=Path(DEFAULT_PACKAGE))
    comp.add_argument("--image", default=None, help="the component image (default: cluster.image)")
    sub_run = sub.add_parser("submit", parents=[config], help="start a run on a Kubeflow Pipelines server")
    sub_run.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example.com/pipeline")
    sub_run.add_argument("--namespace", default=None, help="Kubeflow profile namespace (multi-user KFP; "
                         "default: $KFP_NAMESPACE)")
    sub_run.add_argument("--experiment", default="spo", help="KFP experiment name, created when missing (default: spo)")
    sub_run.add_argument("--run-name", default=None, help="the run's display name (default: package name and time)")
    sub_run.add_argument("--auth", choices=("token", "in-cluster", "none"), default=None,
                         help="token: bearer token from $KFP_TOKEN; in-cluster: this pod's ServiceAccount token; "
                         "none (default: token if KFP_TOKEN is set, else none)")
    sub_run.add_argument("--package", type=Path, default=None, help="a compiled package (default: compile now)")
    sub_run.add_argument("--image", default=None, help="the component image when compiling (default: cluster.image)")
    sub_run.add_argument("--no-cache", action="store_true", help="disable KFP caching for every task of this run")
    sub_run.add_argument("--ui-url", default=None, help="KFP UI address for the printed link (default: --host)")
    local = sub.add_parser("run-local", parents=[config], help="run the whole DAG here with kfp.local")
    local.add_argument("--pipeline-root", type=Path, default=Path("outputs/kfp-local"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config_text = params_yaml(args.params, args.profile, args.overrides, getattr(args, "package", None))
    except ConfigError as err:
        print(f"spo pipeline {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command == "compile":
        try:
            print(f"wrote {compile_pipeline(args.output, config_text, args.image)}")
        except ConfigError as err:
            print(f"spo pipeline compile: {err}", file=sys.stderr)
            return 2
    elif args.command == "submit":
        return submit(args, config_text)
    else:
        for key, value in run_local(args.pipeline_root, config_text).items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
