"""Benchmark: one step-aware preference model (SPM) training step at real architecture sizes, random init,
split into its parts: VAE encode of both images, the frozen base UNet's one-step x̂0 (CFG, both images of
every pair in one call), VAE decode, SPM forward, backward, optimizer. The code measured is the stage's
own (spo.training.spm_training.noisy_x0_images, spm_pair_scores, spm_loss).

Only our structure is measured: how the published trainer batches these calls was not read closely enough
to reproduce its cost (../shared/reference/spo-reference.md 2.2 describes what it computes, not its batching).

    python benchmarks/spm_step.py --device cpu                   # tiny stand-ins, seconds
    python benchmarks/spm_step.py --device cuda --batch 16       # SD1.5 + ViT-H/14 at their real sizes
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spo_round import Clock, real_models, tiny_models, write_json  # noqa: E402

from spo.config import load_profile  # noqa: E402
from spo.training.spm_training import noisy_x0_images, sample_timesteps, spm_loss, spm_pair_scores  # noqa: E402

# the SD1.5 SPM recipe: 8,000 steps of 16 pairs on each of 4 GPUs (spo-reference.md 2.4; 16x more if
# DeepSpeed's gradient_accumulation_steps 16 applied, which was not verified)
RECIPE_SPM_PAIRS = 8000 * 16 * 4


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = load_profile(args.arch, require_implemented=False).train_spm
    with tempfile.TemporaryDirectory() as tmp:
        model, spm = tiny_models(args.arch, Path(tmp)) if args.size == "tiny" else real_models(args.arch, device, dtype)
    for part in (model.unet, model.vae, model.text_encoder, model.text_encoder_2):
        if part is not None:
            part.to(device).requires_grad_(False)
    spm = spm.to(device).train()
    model.scheduler.set_timesteps(model.scheduler.config.num_train_timesteps)
    resolution = args.resolution or model.default_resolution
    optimizer = torch.optim.AdamW([p for p in spm.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    generator = torch.Generator().manual_seed(0)
    prompts = [f"a photo of object {i} in a garden" for i in range(args.batch)]
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.steps + 1):  # step 0 warms up and is not counted
        c = clock if step else Clock(device)
        images = [torch.rand(args.batch, 3, resolution, resolution, generator=generator).to(device) * 2 - 1
                  for _ in range(2)]
        t = sample_timesteps(args.batch, model.scheduler.config.num_train_timesteps, generator).to(device)
        with c.phase("step"):
            with c.phase("x0_inputs"):  # encode + UNet + decode, under no_grad (the frozen base model)
                x0_0, x0_1 = noisy_x0_images(model, images[0], images[1], prompts, t, cfg.guidance_scale, generator)
            with c.phase("spm_forward"):
                s0, s1 = spm_pair_scores(spm, x0_0, x0_1, prompts, t)
                loss = spm_loss(s0, s1, torch.ones(args.batch, device=device), torch.zeros(args.batch, device=device))
            with c.phase("backward"):
                loss.backward()
            with c.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    seconds = {k: v / args.steps for k, v in clock.seconds.items()}
    return {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "arch": args.arch, "size": args.size, "resolution": resolution, "pairs_per_step": args.batch,
            "seconds_per_step": seconds["step"], "pairs_per_second": args.batch / seconds["step"],
            "breakdown_s": {k: seconds[k] for k in ("x0_inputs", "spm_forward", "backward", "optimizer")},
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "projected_recipe_gpu_hours": RECIPE_SPM_PAIRS / (args.batch / seconds["step"]) / 3600}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=("tiny", "real"), default=None, help="default: tiny on cpu, real on cuda")
    parser.add_argument("--batch", type=int, default=None, help="pairs per step (default: 4 on cpu, 16 on cuda)")
    parser.add_argument("--steps", type=int, default=2, help="measured steps, after one warm-up step")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.size = args.size or ("real" if cuda else "tiny")
    args.batch = args.batch or (16 if cuda else 4)
    out = run(args)
    b = out["breakdown_s"]
    print(f"{'s/step':>8}  {'pairs/s':>8}  {'x0 inputs':>9}  {'SPM fwd':>8}  {'backward':>8}  {'optim':>6}  {'recipe GPU-h':>12}")
    print(f"{out['seconds_per_step']:8.3f}  {out['pairs_per_second']:8.2f}  {b['x0_inputs']:9.3f}  {b['spm_forward']:8.3f}  "
          f"{b['backward']:8.3f}  {b['optimizer']:6.3f}  {out['projected_recipe_gpu_hours']:12.1f}")
    write_json(out, args.out)
    return out


if __name__ == "__main__":
    main()
