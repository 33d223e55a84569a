"""The `spo` command: run a stage, switch the parameter profile, or drive the Kubeflow pipeline.

    spo prepare|validate|train_spm|train_spo|evaluate|register [stage args]   (what dvc.yaml runs)
    spo profile list | show | use NAME
    spo pipeline compile|submit|run-local [...]                              (pipelines/cli.py; needs kfp)

Stage and pipeline modules are imported only when asked for, so `spo profile` stays fast and `spo/`
never imports kfp.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import sys
from pathlib import Path

import yaml

from spo.atomic_write import atomic_file
from spo.config import (
    ConfigError,
    load_config,
    load_profile,
    profile_names,
    profile_path,
    unimplemented,
)
from spo.stages import STAGES

USAGE = f"""usage: spo COMMAND [ARGS]

commands:
  {' | '.join(STAGES)}   run one pipeline stage (see `spo STAGE --help`)
  profile list | show | use NAME   list the profiles, show the active one, or switch params.yaml to NAME
  pipeline compile | submit | run-local   compile, submit or locally run the Kubeflow pipeline
"""


def use_profile(name: str, params: Path) -> None:
    """Validate profiles/NAME.yaml (it must also run today), then copy it over `params` atomically (the
    old file stays on error)."""
    load_profile(name)
    with atomic_file(params) as tmp:
        tmp.write_text(profile_path(name).read_text(encoding="utf-8"), encoding="utf-8")


def show_profile(params: Path) -> str:
    """The active profile's name, and how params.yaml differs from profiles/NAME.yaml (if it does).
    A profile that cannot run yet is shown, with a note saying what it needs."""
    cfg = load_config(params, require_implemented=False)
    text, source = params.read_text(encoding="utf-8"), profile_path(cfg.profile)
    source_text = source.read_text(encoding="utf-8")
    needs = unimplemented(cfg)
    note = f"\nnote: stages refuse this config: it needs {' and '.join(needs)}, not implemented yet" if needs else ""
    if yaml.safe_load(source_text) == yaml.safe_load(text):
        return f"profile: {cfg.profile} ({params} == {source.name}){note}"
    diff = difflib.unified_diff(source_text.splitlines(), text.splitlines(), str(source), str(params), lineterm="")
    return f"profile: {cfg.profile} ({params} differs from {source.name}):\n" + "\n".join(diff) + note


def profile_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="spo profile", description="Manage the parameter profile.")
    params = argparse.ArgumentParser(add_help=False)
    params.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (default: params.yaml)")
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list the profiles")
    sub.add_parser("show", parents=[params], help="show the active profile")
    use = sub.add_parser("use", parents=[params], help="copy profiles/NAME.yaml over the params file")
    use.add_argument("name")
    args = parser.parse_args(argv)
    if args.action == "list":
        print("\n".join(profile_names()))
    elif args.action == "show":
        print(show_profile(args.params))
    else:
        use_profile(args.name, args.params)
        print(f"{args.params} <- profiles/{args.name}.yaml")
    return 0


def _pipeline_cli():
    if importlib.util.find_spec("kfp") is None:  # spo/ never imports kfp itself
        raise SystemExit('spo pipeline: kfp is not installed; pip install -e ".[pipeline]"')
    return importlib.import_module("pipelines.cli")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command in STAGES:
            importlib.import_module(f"spo.stages.{command}").main(rest)
            return 0
        if command == "profile":
            return profile_main(rest)
        if command == "pipeline":
            return _pipeline_cli().main(rest) or 0
    except ConfigError as err:
        print(f"spo {command}: {err}", file=sys.stderr)
        return 2
    print(f"spo: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
