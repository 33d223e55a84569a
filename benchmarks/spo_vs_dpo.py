"""The paper's claim, measured on `digits`: SPO vs Diffusion-DPO at an equal training budget, over seeds.

Runs the DVC pipeline once per training seed (`dvc exp run -S train_spo.seed=S -S train_dpo.seed=S`, one
DVC experiment each, one after another in REPO: the data, the base model and the SPM are the same for
every seed, only SPO's and DPO's own draws change), then reads each run's evaluation and learning curves
and writes to OUT:
  table.md / results.json   oracle aesthetic, alignment and utility (the rater's preference score) of base,
                            SPO and DPO, win rates vs base and SPO vs DPO: mean +- std over seeds, plus
                            each method's training seconds and pairs seen
  curves/<method>_seed<S>.csv  the learning curve (oracle scores of eval samples vs training seconds);
                            dvc.yaml's "SPO vs DPO learning curves" plot draws them
  curves.png                the same, for the README

    python benchmarks/spo_vs_dpo.py --repo . --seeds 42 43 44 --out benchmarks/results/spo_vs_dpo

The profile's own seed (42 on digits) runs with the training seeds left at null, so a `dvc repro` that
already ran is reused for it. Sequential `dvc exp run`s rather than a `--queue`: each run's curve files
are read from the workspace as soon as it finishes, and the experiments still list in `dvc exp show`.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

METRICS = ("oracle_aesthetic", "oracle_alignment", "oracle_utility")
METHODS = ("base", "spo", "dpo")


def run_seed(repo: Path, seed: int, default_seed: int, curve_points: int | None) -> None:
    value = "null" if seed == default_seed else str(seed)
    command = ["dvc", "exp", "run", "-S", f"train_spo.seed={value}", "-S", f"train_dpo.seed={value}"]
    if curve_points is not None:
        command += ["-S", f"learning_curve.points={curve_points}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=repo, check=True)


def read_curve(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def collect(repo: Path) -> dict:
    evaluation = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    out = {"models": {m: {k: evaluation["models"][m][k] for k in METRICS} for m in METHODS},
           "win_rate": {}, "training": {}, "curves": {}}
    for pair in ("spo_vs_base", "dpo_vs_base"):
        out["win_rate"][pair] = {k: evaluation["win_rate"][pair][k] for k in METRICS}
    out["win_rate"]["spo_vs_dpo"] = {k: 1.0 - evaluation["win_rate"]["dpo_vs_spo"][k] for k in METRICS}
    for method in ("spo", "dpo"):
        metrics = json.loads((repo / f"models/{method}/metrics.json").read_text())
        history = list(csv.DictReader((repo / f"models/{method}/history.csv").open()))
        out["training"][method] = {"train_seconds": float(history[-1]["train_seconds"]),
                                   "pairs_seen": float(history[-1]["pairs_seen"]),
                                   "optimizer_steps": metrics["optimizer_steps"]}
        out["curves"][method] = read_curve(repo / f"models/{method}/curve.csv")
    return out


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(runs: dict[int, dict]) -> str:
    seeds = sorted(runs)
    lines = [f"Seeds {', '.join(map(str, seeds))} (mean ± std over seeds).", "",
             "| metric | base | SPO | DPO | SPO win rate vs base | DPO win rate vs base | SPO win rate vs DPO |",
             "|---|---|---|---|---|---|---|"]
    for k in METRICS:
        cells = [mean_std([runs[s]["models"][m][k] for s in seeds]) for m in METHODS]
        cells += [mean_std([runs[s]["win_rate"][p][k] for s in seeds]) for p in ("spo_vs_base", "dpo_vs_base",
                                                                                  "spo_vs_dpo")]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "| method | training seconds | pairs seen | optimizer steps |", "|---|---|---|---|"]
    for method in ("spo", "dpo"):
        t = [runs[s]["training"][method] for s in seeds]
        lines.append(f"| {method.upper()} | {mean_std([x['train_seconds'] for x in t])} | "
                     f"{mean_std([x['pairs_seen'] for x in t])} | {mean_std([x['optimizer_steps'] for x in t])} |")
    return "\n".join(lines) + "\n"


def write_outputs(runs: dict[int, dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({str(s): r for s, r in runs.items()}, indent=2) + "\n")
    (out / "table.md").write_text(table(runs))
    curves = out / "curves"
    curves.mkdir(exist_ok=True)
    for seed, run in runs.items():
        for method, rows in run["curves"].items():
            with (curves / f"{method}_seed{seed}.csv").open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    colours = {"spo": "tab:blue", "dpo": "tab:orange"}
    for ax, metric in zip(axes, METRICS):
        for seed, run in sorted(runs.items()):
            for method, rows in run["curves"].items():
                ax.plot([r["train_seconds"] for r in rows], [r[metric] for r in rows], marker="o", markersize=3,
                        color=colours[method], alpha=0.8, label=method.upper() if seed == min(runs) else None)
        ax.set_xlabel("training seconds (2-core CPU)")
        ax.set_title(metric)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="a DVC checkout on the digits profile")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--curve-points", type=int, default=None, help="default: params.yaml's learning_curve.points")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/spo_vs_dpo"))
    parser.add_argument("--collect-only", action="store_true", help="read OUT/results.json's runs, rewrite OUT")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.repo.resolve()))
    from spo.config import load_config

    cfg = load_config(args.repo / "params.yaml")
    if cfg.profile != "digits":
        parser.error(f"{args.repo}: profile {cfg.profile}; this comparison reads the digits oracle's scores")
    runs: dict[int, dict] = {}
    if args.collect_only:
        runs = {int(s): r for s, r in json.loads((args.out / "results.json").read_text()).items()}
    else:
        for seed in args.seeds:
            run_seed(args.repo, seed, cfg.seed, args.curve_points)
            runs[seed] = collect(args.repo)
            write_outputs(runs, args.out)  # after every seed: an interrupted comparison keeps what it has
    write_outputs(runs, args.out)
    print(table(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
