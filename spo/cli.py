"""The `spo` command: run a stage, switch the parameter profile, or drive the Kubeflow pipeline.

    spo prepare|validate|train_spm|train_spo|train_dpo|evaluate|register [stage args]   (what dvc.yaml runs)
    spo profile list | show | use NAME
    spo fixtures build DIR [--profile sd15|sdxl|all]                          (stand-ins of the real models)
    spo export --merged OUT [--base BASE] [--lora DIR | --unet DIR] [--vae VAE]   (one diffusers pipeline dir)
    spo distill-decoder OUT [--steps N]          (a tiny scoring decoder for train_spo.scoring_decoder)
    spo pipeline compile|submit|run-local [...]                              (pipelines/cli.py; needs kfp)

Stage and pipeline modules are imported only when asked for, so `spo profile` stays fast and `spo/`
never imports kfp.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import yaml

from spo.atomic_write import atomic_file
from spo.config import (
    ConfigError,
    apply_overrides,
    load_config,
    load_profile,
    profile_names,
    profile_path,
    read_params,
    unimplemented,
)
from spo.data.model_locations import base_model_location
from spo.stages import STAGES

DEFAULT_PREPARED_DIR = Path("data/prepared")  # dvc.yaml's `prepare` output (digits: the base model is built there)
DEFAULT_LORA_DIR = Path("models/spo/lora")  # dvc.yaml's `train_spo` output

USAGE = f"""usage: spo COMMAND [ARGS]

commands:
  {' | '.join(STAGES)}   run one pipeline stage (see `spo STAGE --help`)
  profile list | show | use NAME   list the profiles, show the active one, or switch params.yaml to NAME
  fixtures build DIR [--profile sd15|sdxl|all]   write tiny stand-ins of the real models and Pick-a-Pic to DIR
  export --merged OUT [--base BASE] [--lora DIR | --unet DIR] [--vae VAE]
                  write the base pipeline with the SPO LoRA fused (or a full UNet swapped in) to OUT
  distill-decoder OUT [--steps N]   distil a tiny x̂0 decoder from the base model's VAE (opt-in fast scoring:
                  -S train_spo.scoring_decoder=OUT; real models use madebyollin/taesd or taesdxl)
  pipeline compile | submit | run-local   compile, submit or locally run the Kubeflow pipeline
"""


def _set_line(text: str, override: str) -> str:
    """`text` (a profile's YAML) with the line of `section.key` (or a top-level `key`) set to the override's
    value; the profile's comment becomes `# was: OLD`, so params.yaml keeps its notes and shows the change."""
    key, _, value = override.partition("=")
    path = key.strip().split(".")
    if len(path) > 2:
        raise ConfigError(f"override {override!r}: only section.key (two levels) can be set here")
    lines = text.splitlines(keepends=True)
    start, indent = 0, ""
    if len(path) == 2:
        heads = [i for i, line in enumerate(lines) if re.match(rf"^{re.escape(path[0])}:\s*(#.*)?$", line)]
        if not heads:
            raise ConfigError(f"override {override!r}: no section {path[0]!r} in the profile")
        start, indent = heads[0] + 1, "  "
    pattern = re.compile(rf"^{indent}{re.escape(path[-1])}:(\s*)([^#\n]*?)\s*(#.*)?$")
    for i in range(start, len(lines)):
        if len(path) == 2 and i > start and lines[i].strip() and not lines[i].startswith(" "):
            break  # the next section
        match = pattern.match(lines[i].rstrip("\n"))
        if match:
            old = match.group(2).strip()
            end = i + 1
            if not old:  # a block value (a list of entries): its deeper-indented lines go with it
                while end < len(lines) and (lines[end].startswith((indent + "  ", indent + "- "))):
                    end += 1
                old = "a block of %d lines" % (end - i - 1)
            lines[i:end] = [f"{indent}{path[-1]}: {value.strip()}  # was: {old}\n"]
            return "".join(lines)
    raise ConfigError(f"override {override!r}: no key {key.strip()!r} in the profile")


def use_profile(name: str, params: Path, overrides: list[str] | None = None) -> None:
    """Validate profiles/NAME.yaml with `overrides` (DVC's `-S section.key=value`; it must also run today),
    then write it over `params` atomically (the old file stays on error). An override rewrites its line,
    so `dvc repro` then runs the changed profile (`dvc repro` itself takes no -S)."""
    load_profile(name, overrides)
    text = profile_path(name).read_text(encoding="utf-8")
    for override in overrides or []:
        text = _set_line(text, override)
    written = yaml.safe_load(text)
    if written != yaml.safe_load(apply_overrides_text(profile_path(name), overrides or [])):
        raise ConfigError(f"overrides {overrides}: could not be written into {params} faithfully")
    with atomic_file(params) as tmp:
        tmp.write_text(text, encoding="utf-8")


def apply_overrides_text(profile: Path, overrides: list[str]) -> str:
    """The profile with `overrides` applied, as YAML (what `use_profile` must have written)."""
    return yaml.safe_dump(apply_overrides(read_params(profile), overrides))


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
    use.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="change a value on the way, e.g. -S model.base_model=/data/sd15 (repeatable)")
    args = parser.parse_args(argv)
    if args.action == "list":
        print("\n".join(profile_names()))
    elif args.action == "show":
        print(show_profile(args.params))
    else:
        use_profile(args.name, args.params, args.overrides)
        changed = f" with {len(args.overrides)} override(s)" if args.overrides else ""
        print(f"{args.params} <- profiles/{args.name}.yaml{changed}")
    return 0


def fixtures_main(argv: list[str]) -> int:
    """Build the stand-ins (spo.standins) and print, per profile, the command that runs it on them."""
    parser = argparse.ArgumentParser(prog="spo fixtures", description="Tiny stand-ins of the real models and data.")
    sub = parser.add_subparsers(dest="action", required=True)
    build = sub.add_parser("build", help="write the stand-ins to DIR and print the overrides that use them")
    build.add_argument("dir", type=Path)
    build.add_argument("--profile", choices=("sd15", "sdxl", "all"), default="all")
    build.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from spo.standins.build import (  # torch/diffusers: only when asked
        PROFILES,
        build_standins,
        profile_overrides,
    )

    profiles = PROFILES if args.profile == "all" else (args.profile,)
    standins = build_standins(args.dir, profiles, seed=args.seed)
    print(f"stand-ins for {', '.join(profiles)} written to {args.dir.absolute()}")
    for profile in profiles:
        sets = " ".join(f"-S {shlex.quote(item)}" for item in profile_overrides(standins, profile))
        print(f"\n# {profile} on the stand-ins (CPU, minutes):")
        print(f"spo profile use {profile} {sets} && dvc repro")
    if standins.taesd is not None:
        decoder = shlex.quote(f'train_spo.scoring_decoder="{standins.taesd}"')  # quoted as the paths above
        print(f"\n# opt-in fast scoring (TAESD's stand-in decodes what the SPM scores), add: -S {decoder}")
    return 0


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spo export", description="Export the SPO fine-tune for other tools.")
    parser.add_argument("--merged", type=Path, metavar="OUT",
                        help="write the base pipeline with the fine-tune baked in to OUT (diffusers format)")
    parser.add_argument("--base", metavar="BASE", help="base pipeline dir or hub id (default: model.base_model of --params)")
    tune = parser.add_mutually_exclusive_group()
    tune.add_argument("--lora", type=Path, metavar="DIR", help=f"LoRA dir to fuse (default: {DEFAULT_LORA_DIR})")
    tune.add_argument("--unet", type=Path, metavar="DIR", help="full fine-tuned UNet: a dir holding unet/, or a UNet dir")
    parser.add_argument("--vae", metavar="VAE", help="replacement VAE dir or hub id (default: model.vae of --params when --base "
                                      "is not given; with --base, none)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="the params file (default: params.yaml)")
    return parser


def export_main(argv: list[str]) -> int:
    """`spo export --merged OUT`: base, VAE and LoRA default to the active params and dvc.yaml's outputs."""
    parser = _export_parser()
    args = parser.parse_args(argv)
    if args.merged is None:
        print("spo export: nothing to export: give --merged OUT (the only format today, a merged diffusers "
              f"pipeline; the LoRA itself, {DEFAULT_LORA_DIR}, loads with pipe.load_lora_weights)", file=sys.stderr)
        return 2
    base, vae = args.base, args.vae
    if base is None:  # the model the params train: the VAE replacement belongs to it
        cfg = load_config(args.params, require_implemented=False)
        base, vae = base_model_location(cfg, DEFAULT_PREPARED_DIR), vae or cfg.model.vae
    lora = None if args.unet else args.lora or DEFAULT_LORA_DIR
    from spo.models.export import export_merged  # torch/diffusers: only when asked

    export_merged(base, args.merged, lora_dir=lora, unet_dir=args.unet, vae=vae)
    print(f"{args.merged} <- {base} + {args.unet or lora}{f' + vae {vae}' if vae else ''}")
    return 0


def distill_main(argv: list[str]) -> int:
    """`spo distill-decoder OUT`: the tiny scoring decoder of the active params' base model."""
    from spo.training.decoder_distillation import DistillSettings

    defaults = DistillSettings()
    parser = argparse.ArgumentParser(prog="spo distill-decoder",
                                     description="Distil an AutoencoderTiny decoder from the base model's VAE on the "
                                                 "x̂0 latents the SPM scores (for train_spo.scoring_decoder).")
    parser.add_argument("out", type=Path, help="output directory (diffusers AutoencoderTiny + distillation.json)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared-dir", type=Path, default=DEFAULT_PREPARED_DIR)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    cfg = load_config(args.params)
    from spo.training.decoder_distillation import distill_for_config  # torch/diffusers: only when asked

    settings = DistillSettings(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                               guidance_scale=cfg.train_spo.guidance_scale, seed=args.seed)
    report = distill_for_config(cfg, args.prepared_dir, args.out, settings)
    psnr = ", ".join(f"{t} {v:.1f}" for t, v in report["psnr_db_vs_vae"].items())
    print(f"{args.out}: {report['parameters']['decoder']:,} decoder parameters (the VAE's: "
          f"{report['parameters']['vae_decoder']:,}); PSNR vs the VAE (dB): {psnr}")
    print(f"use it: dvc exp run -S train_spo.scoring_decoder={args.out}")
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
        if command == "fixtures":
            return fixtures_main(rest)
        if command == "export":
            return export_main(rest)
        if command == "distill-decoder":
            return distill_main(rest)
        if command == "pipeline":
            return _pipeline_cli().main(rest) or 0
    except ConfigError as err:
        print(f"spo {command}: {err}", file=sys.stderr)
        return 2
    print(f"spo: unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
