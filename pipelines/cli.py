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


def params_yaml(params: Path | None, profile: str | None, overrides: list[str]) -> str:
    """The validated config as one line of YAML (what the pipeline's `params_yaml` parameter receives).
    Bad input (file, YAML, key, value, or a profile that cannot run yet) is a ConfigError naming it."""
    path = profile_path(profile) if profile else (params or Path("params.yaml"))
    data = apply_overrides(read_params(path), overrides)
    try:
        cfg = config_from_dict(data, require_implemented=False)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    check_implemented(cfg)
    # one line: kfp 2.17 copies defaults into the package's header comment verbatim, so a newline in a
    # default breaks the YAML (kubeflow/pipelines#10438). Flow style keeps floats YAML-safe (6.0e-05).
    return yaml.safe_dump(data, default_flow_style=True, width=float("inf"), sort_keys=False).strip()


def compile_pipeline(output: Path, config_text: str) -> Path:
    from kfp import compiler

    from pipelines.spo_pipeline import spo_pipeline

    compiler.Compiler().compile(spo_pipeline, str(output), pipeline_parameters={"params_yaml": config_text})
    return output


def submit(args: argparse.Namespace, config_text: str) -> str:
    """Compile (unless --package is given) and start a run; returns the run id."""
    import kfp

    with tempfile.TemporaryDirectory() as tmp:
        package = args.package or compile_pipeline(Path(tmp) / DEFAULT_PACKAGE, config_text)
        client = kfp.Client(host=args.host, existing_token=os.environ.get("KFP_TOKEN") or None,
                            namespace=os.environ.get("KFP_NAMESPACE", "kubeflow"))
        result = client.create_run_from_pipeline_package(
            str(package), arguments={"params_yaml": config_text}, run_name=args.run_name,
            experiment_name=args.experiment, enable_caching=not args.no_cache)
    return result.run_id


def run_local(pipeline_root: Path, config_text: str) -> dict[str, str]:
    """Run the whole DAG in subprocesses of this environment (kfp.local; GPU requests are ignored)."""
    from kfp import local

    from pipelines.spo_pipeline import spo_pipeline

    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{Path.cwd() / 'mlflow.db'}")
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True)
    spo_pipeline(params_yaml=config_text)
    return {"pipeline_root": str(pipeline_root), "mlflow": os.environ["MLFLOW_TRACKING_URI"]}


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
    sub_run = sub.add_parser("submit", parents=[config], help="start a run on a Kubeflow Pipelines server")
    sub_run.add_argument("--host", required=True, help="KFP API endpoint, e.g. https://kubeflow.example/pipeline")
    sub_run.add_argument("--experiment", default="spo", help="KFP experiment name (default: spo)")
    sub_run.add_argument("--run-name", default=None)
    sub_run.add_argument("--package", type=Path, default=None, help="a compiled package (default: compile now)")
    sub_run.add_argument("--no-cache", action="store_true", help="disable KFP caching for this run")
    local = sub.add_parser("run-local", parents=[config], help="run the whole DAG here with kfp.local")
    local.add_argument("--pipeline-root", type=Path, default=Path("outputs/kfp-local"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config_text = params_yaml(args.params, args.profile, args.overrides)
    except ConfigError as err:
        print(f"spo pipeline {args.command}: {err}", file=sys.stderr)
        return 2
    if args.command == "compile":
        print(f"wrote {compile_pipeline(args.output, config_text)}")
    elif args.command == "submit":
        print(f"submitted run {submit(args, config_text)} to {args.host}")
    else:
        for key, value in run_local(args.pipeline_root, config_text).items():
            print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
