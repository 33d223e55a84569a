"""Benchmark: opt-in fast scoring (train_spo.scoring_decoder), what it buys and what it costs.

The rollout decodes every candidate's x̂0 with the full VAE only for the SPM to resize it to 224 px. A tiny
decoder (AutoencoderTiny; TAESD for the real models, one distilled by `spo distill-decoder` on digits)
decodes the same latents for a fraction of the work, but the SPM was trained on VAE decodes. Measured:

  speed     seconds per image of the VAE decode vs a TAESD-layout AutoencoderTiny (random init: speed only)
            at the digits size and at SD1.5's real size (512 px); the ratio (CPU ratios are one run's)
  fidelity  PSNR of the digits tiny decoder against the VAE on held-out x̂0, per t (from the decoder's
            distillation.json)
  accuracy  the trained SPM's pairwise accuracy per train_spm eval timestep with the VAE vs the tiny decoder
            decoding its inputs (the stage's held-out pairs and noise), and how often the two decoders give
            the SPM the same decision on a pair (all pairs)
  digits    `dvc exp run -S train_spo.scoring_decoder=DIR` over training seeds vs the default, the oracle's
            aesthetic / alignment / utility of the SPO model (reports/evaluate/metrics.json)

    spo distill-decoder models/scoring_decoder          # once (digits; ~8 min on 2 CPU cores)
    python benchmarks/fast_scoring.py --decoder models/scoring_decoder --seeds 42 43 44 \\
        --out benchmarks/results/fast_scoring

Run it in a digits checkout after `dvc repro` (the SPM in models/spm/model, the data in data/prepared). The
seed runs leave params.yaml as the last run set it; the script restores it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spo_round import sd15_vae_config  # noqa: E402  (the benchmarks' real-size configs)

from spo.config import load_config  # noqa: E402

METRICS = ("oracle_aesthetic", "oracle_alignment", "oracle_utility")


# ----------------------------------------------------------------------------------------------------
# speed


def seconds_per_image(decode, latents: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        decode(latents)  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            decode(latents)
    return (time.perf_counter() - start) / repeats / latents.shape[0]


def decode_speed(digits_vae, digits_latent: int, batch: int, real_batch: int, repeats: int) -> list[dict]:
    """VAE vs TAESD-layout tiny decoder: the digits VAE (trained) and SD1.5's VAE at 512 px (random init)."""
    from diffusers import AutoencoderKL

    from spo.models.scoring_decoder import tiny_decoder_like

    torch.manual_seed(0)
    cases = [("digits", digits_vae, digits_latent, batch), ("sd15 512 px", AutoencoderKL(**sd15_vae_config()), 64,
                                                           real_batch)]
    rows = []
    for name, vae, size, n in cases:
        vae = vae.eval()
        tiny = tiny_decoder_like(vae).eval()  # TAESD's width (64) at either size
        latents = torch.randn(n, vae.config.latent_channels, size, size)
        vae_s = seconds_per_image(lambda x: vae.decode(x).sample, latents, repeats)
        tiny_s = seconds_per_image(lambda x: tiny.decode(x).sample, latents, repeats)
        rows.append({"case": name, "batch": n, "vae_s_per_image": vae_s, "tiny_s_per_image": tiny_s,
                     "speedup": vae_s / tiny_s,
                     "vae_decoder_params": sum(p.numel() for p in vae.decoder.parameters()),
                     "tiny_decoder_params": sum(p.numel() for p in tiny.decoder.parameters())})
    return rows


# ----------------------------------------------------------------------------------------------------
# SPM accuracy with either decoder


@torch.no_grad()
def spm_accuracy(cfg, prepared_dir: Path, spm_dir: Path, decoder_dir: Path) -> dict:
    """Per eval t: accuracy with the VAE and with the tiny decoder on the held-out pairs (train_spm's jobs),
    and the fraction of pairs (train + held-out) on which both decoders give the SPM the same decision."""
    from spo.data.model_locations import base_model_location
    from spo.data.prepared_layout import PAIRS_DIR
    from spo.models.diffusion_model import load_diffusion_model
    from spo.models.scoring_decoder import load_scoring_decoder
    from spo.models.step_aware_preference_model import StepAwarePreferenceModel
    from spo.training.spm_inputs import PairsSpec, TrainingPairs, in_process_source, pair_loader, plan_eval_jobs
    from spo.training.spm_training import evaluate_accuracy, pairwise_correct, spm_pair_scores

    spm_cfg = cfg.train_spm
    pairs = TrainingPairs(PairsSpec(str(prepared_dir / PAIRS_DIR), None, cfg.seed))
    load_batch = pair_loader(pairs, cfg.model.resolution)
    model = load_diffusion_model(base_model_location(cfg, prepared_dir), vae=cfg.model.vae)
    tiny = load_scoring_decoder(str(decoder_dir), model.vae)
    spm = StepAwarePreferenceModel.from_pretrained(str(spm_dir / "model")).eval()
    source = in_process_source(model, load_batch, spm_cfg.guidance_scale)
    held_out = plan_eval_jobs(pairs.eval_indices, spm_cfg.eval_timesteps, spm_cfg.batch_size, cfg.seed + 1)
    every = plan_eval_jobs(pairs.train_indices + pairs.eval_indices, spm_cfg.eval_timesteps, spm_cfg.batch_size,
                           cfg.seed + 1)
    out = {}
    for name, decoder in (("vae", None), ("tiny", tiny)):
        model.scoring_decoder = decoder
        out[f"accuracy_{name}"] = evaluate_accuracy(spm, load_batch, held_out, source,
                                                    timesteps=spm_cfg.eval_timesteps)
    agree = {t: [0, 0] for t in spm_cfg.eval_timesteps}
    correct = {name: {t: [0, 0] for t in spm_cfg.eval_timesteps} for name in ("vae", "tiny")}
    for job in every:
        batch, t = load_batch(job.indices), job.timesteps[0]
        decisions = {}
        for name, decoder in (("vae", None), ("tiny", tiny)):
            model.scoring_decoder = decoder
            s0, s1 = spm_pair_scores(spm, *source(job), batch.prompts, torch.tensor(job.timesteps))
            decisions[name] = torch.sign(s0 - s1)
            c, n = pairwise_correct(s0, s1, batch.label_0, batch.label_1)
            correct[name][t][0] += c
            correct[name][t][1] += n
        agree[t][0] += int((decisions["vae"] == decisions["tiny"]).sum())
        agree[t][1] += len(job.indices)
    model.scoring_decoder = None
    out["decision_agreement_all_pairs"] = {t: a / n for t, (a, n) in agree.items()}
    out["accuracy_all_pairs"] = {name: {t: c / n for t, (c, n) in per_t.items()} for name, per_t in correct.items()}
    out["held_out_pairs"], out["all_pairs"] = len(pairs.eval_indices), len(pairs)
    return out


# ----------------------------------------------------------------------------------------------------
# digits results over seeds


def run_arm(repo: Path, seed: int, default_seed: int, decoder: Path | None) -> dict:
    value = "null" if seed == default_seed else str(seed)
    command = ["dvc", "exp", "run", "-S", f"train_spo.seed={value}",
               "-S", f"train_spo.scoring_decoder={'null' if decoder is None else decoder.resolve()}"]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, cwd=repo, check=True)
    evaluation = json.loads((repo / "reports/evaluate/metrics.json").read_text())
    train = json.loads((repo / "models/spo/metrics.json").read_text())
    return {"spo": {k: evaluation["models"]["spo"][k] for k in METRICS},
            "base": {k: evaluation["models"]["base"][k] for k in METRICS},
            "spo_win_rate_vs_base": {k: evaluation["win_rate"]["spo_vs_base"][k] for k in METRICS},
            "train_seconds": train["train_seconds"], "optimizer_steps": train["optimizer_steps"],
            "mean_kept_pair_rate": train["mean_kept_pair_rate"]}


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


# ----------------------------------------------------------------------------------------------------
# report


def report(result: dict) -> str:
    lines = ["## decode speed (CPU: ratios only)", "", "| case | batch | VAE s/img | tiny s/img | speed-up |"
             " VAE decoder params | tiny decoder params |", "|---|---|---|---|---|---|---|"]
    for r in result["speed"]:
        lines.append(f"| {r['case']} | {r['batch']} | {r['vae_s_per_image']:.4f} | {r['tiny_s_per_image']:.4f} | "
                     f"**{r['speedup']:.1f}×** | {r['vae_decoder_params']:,} | {r['tiny_decoder_params']:,} |")
    if "fidelity_psnr_db" in result:
        lines += ["", "## digits tiny decoder vs the VAE (held-out x̂0)", "",
                  "| t | " + " | ".join(result["fidelity_psnr_db"]) + " |",
                  "|---|" + "---|" * len(result["fidelity_psnr_db"]),
                  "| PSNR dB | " + " | ".join(f"{v:.1f}" for v in result["fidelity_psnr_db"].values()) + " |"]
    if "spm" in result:
        spm = result["spm"]
        ts = list(spm["accuracy_vae"])
        lines += ["", f"## SPM pairwise accuracy per t ({spm['held_out_pairs']} held-out pairs; agreement on all "
                      f"{spm['all_pairs']})", "", "| | " + " | ".join(f"t={t}" for t in ts) + " |",
                  "|---|" + "---|" * len(ts)]
        for label, values in (("held-out, VAE", spm["accuracy_vae"]), ("held-out, tiny", spm["accuracy_tiny"]),
                              ("all pairs, VAE", spm["accuracy_all_pairs"]["vae"]),
                              ("all pairs, tiny", spm["accuracy_all_pairs"]["tiny"]),
                              ("same decision", spm["decision_agreement_all_pairs"])):
            lines.append(f"| {label} | " + " | ".join(f"{values[t]:.3f}" for t in ts) + " |")
    if result.get("digits"):
        arms = result["digits"]
        seeds = sorted({s for arm in arms.values() for s in arm})
        lines += ["", f"## digits SPO over seeds {', '.join(map(str, seeds))} (mean ± std)", "",
                  "| scoring | " + " | ".join(f"SPO {k}" for k in METRICS) + " | SPO win rate vs base (utility) |"
                  " train s | kept pair rate |", "|---|" + "---|" * (len(METRICS) + 3)]
        for arm, runs in arms.items():
            rs = [runs[s] for s in sorted(runs)]
            lines.append(f"| {arm} | " + " | ".join(mean_std([r["spo"][k] for r in rs]) for k in METRICS)
                         + f" | {mean_std([r['spo_win_rate_vs_base']['oracle_utility'] for r in rs])}"
                         + f" | {mean_std([r['train_seconds'] for r in rs])}"
                         + f" | {mean_std([r['mean_kept_pair_rate'] for r in rs])} |")
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "table.md").write_text(report(result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("."), help="a digits DVC checkout after dvc repro")
    parser.add_argument("--decoder", type=Path, default=Path("models/scoring_decoder"),
                        help="the tiny decoder (spo distill-decoder DIR)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[42, 43, 44], help="none: skip the digits runs")
    parser.add_argument("--parts", nargs="+", default=["speed", "spm", "digits"], choices=("speed", "spm", "digits"))
    parser.add_argument("--batch", type=int, default=32, help="digits decode batch")
    parser.add_argument("--real-batch", type=int, default=1, help="512 px decode batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fast_scoring"))
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    cfg = load_config(repo / "params.yaml")
    if cfg.profile != "digits":
        parser.error(f"{repo}: profile {cfg.profile}; this benchmark reads the digits SPM and oracle")
    decoder = args.decoder if args.decoder.is_absolute() else repo / args.decoder
    if not (decoder / "config.json").is_file():
        parser.error(f"{decoder}: no decoder; run `spo distill-decoder {args.decoder}` first")
    previous = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").is_file() else {}
    result = {"date": time.strftime("%Y-%m-%d"), "torch_threads": torch.get_num_threads(), **{
        k: v for k, v in previous.items() if k in ("speed", "spm", "digits", "fidelity_psnr_db")}}
    result["fidelity_psnr_db"] = json.loads((decoder / "distillation.json").read_text())["psnr_db_vs_vae"]
    prepared = repo / "data/prepared"
    if "speed" in args.parts:
        from spo.data.model_locations import base_model_location
        from spo.models.diffusion_model import load_diffusion_model

        vae = load_diffusion_model(base_model_location(cfg, prepared)).vae
        result["speed"] = decode_speed(vae, cfg.model.resolution // 2 ** (len(vae.config.block_out_channels) - 1),
                                       args.batch, args.real_batch, args.repeats)
        write(result, args.out)
    if "spm" in args.parts:
        result["spm"] = spm_accuracy(cfg, prepared, repo / "models/spm", decoder)
        write(result, args.out)
    if "digits" in args.parts and args.seeds:
        params = (repo / "params.yaml").read_text()
        arms = result.setdefault("digits", {})
        try:
            for seed in args.seeds:
                for arm, path in (("VAE (default)", None), ("tiny decoder", decoder)):
                    arms.setdefault(arm, {})[str(seed)] = run_arm(repo, seed, cfg.seed, path)
                    write(result, args.out)  # after every run: an interrupted benchmark keeps what it has
        finally:
            (repo / "params.yaml").write_text(params)
    write(result, args.out)
    print(report(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
