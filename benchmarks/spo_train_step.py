"""Benchmark: one SPO training micro-batch, published structure vs ours, identical maths.

published: 4 UNet calls per pair batch (policy/reference x win/lose), reference = a deepcopy of the UNet
ours:      2 UNet calls (win and lose share x_t), reference = the same UNet with its LoRA disabled

Prints a table and writes JSON. On CPU only the ratio is meaningful; absolute times need a GPU.
    python benchmarks/spo_train_step.py --size tiny --pairs 10 --repeats 5 --out benchmarks/results/spo_train_step.json
    python benchmarks/spo_train_step.py --size sd15 --pairs 10 --device cuda   # SD1.5-sized random init
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel

from spo.config import load_profile
from spo.diffusion.ddim import ddim_step, gaussian_log_prob
from spo.diffusion.guidance import guided_noise_pred
from spo.models.diffusion_model import DiffusionModel
from spo.models.lora import add_lora
from spo.training.spo_loss import spo_loss
from spo.training.spo_trainer import pair_log_probs
from spo.training.step_sampling import StepPairs

SIZES = {
    "tiny": dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    "sd15": dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                 attention_head_dim=8),
}
TEXT_LEN = {"tiny": 8, "sd15": 77}


def published_log_probs(unet, reference, scheduler, pairs, cond, uncond, cfg):
    """The published loop: separate calls for win and lose, for policy and a copied reference."""
    out = []
    for net, grad in ((unet, True), (reference, False)):
        for target in (pairs.latents_win, pairs.latents_lose):
            with torch.set_grad_enabled(grad):
                eps = guided_noise_pred(net, pairs.latents_t, pairs.timesteps, cond, uncond, cfg.guidance_scale)
                step = ddim_step(scheduler, eps.float(), pairs.timesteps, pairs.latents_t.float(), cfg.eta)
                out.append(gaussian_log_prob(target, step.mean, step.sigma))
    return out  # policy_win, policy_lose, ref_win, ref_lose


def timed(fn, repeats, device):
    fn()  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/spo_train_step.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    unet = UNet2DConditionModel(**SIZES[args.size]).to(args.device, dtype)
    cfg = load_profile("sd15", require_implemented=False).train_spo  # the published SD1.5 recipe
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(cfg.num_inference_steps)
    reference = copy.deepcopy(unet).requires_grad_(False)  # the published frozen copy
    add_lora(unet, cfg)
    n, s = args.pairs, unet.config.sample_size
    shape = (n, 4, s, s)
    pairs = StepPairs(torch.randn(shape, device=args.device), torch.randn(shape, device=args.device),
                      torch.randn(shape, device=args.device), torch.full((n,), 501, device=args.device),
                      torch.arange(n, device=args.device), torch.full((n,), 10, device=args.device))
    d = unet.config.cross_attention_dim
    cond = torch.randn(n, TEXT_LEN[args.size], d, device=args.device, dtype=dtype)
    uncond = torch.randn(1, TEXT_LEN[args.size], d, device=args.device, dtype=dtype)
    model = DiffusionModel(unet=unet, vae=None, text_encoder=None, tokenizer=None, scheduler=scheduler)

    def loss_backward(lp):
        spo_loss(*lp, beta=cfg.beta, clip_eps=cfg.clip_eps).loss.backward()

    def ours():
        lp = pair_log_probs(model, pairs, cond, uncond, cfg)
        loss_backward((lp.policy_win, lp.policy_lose, lp.ref_win, lp.ref_lose))

    def published():
        loss_backward(published_log_probs(unet, reference, scheduler, pairs, cond, uncond, cfg))

    fast = pair_log_probs(model, pairs, cond, uncond, cfg)
    slow = published_log_probs(unet, reference, scheduler, pairs, cond, uncond, cfg)
    max_diff = max((a - b).abs().max().item() for a, b in zip(
        (fast.policy_win, fast.policy_lose, fast.ref_win, fast.ref_lose), slow))
    t_pub, t_ours = timed(published, args.repeats, args.device), timed(ours, args.repeats, args.device)
    ref_bytes = sum(p.numel() * p.element_size() for p in reference.parameters())
    result = {"size": args.size, "device": args.device, "pairs": n, "repeats": args.repeats,
              "published_s": t_pub, "ours_s": t_ours, "speedup": t_pub / t_ours,
              "reference_copy_mb_saved": ref_bytes / 2**20, "max_logprob_diff": max_diff}
    print(f"{'structure':<12}{'s / micro-batch':>18}{'UNet calls':>12}")
    print(f"{'published':<12}{t_pub:>18.4f}{4:>12}")
    print(f"{'ours':<12}{t_ours:>18.4f}{2:>12}")
    print(f"speedup {t_pub / t_ours:.2f}x, reference copy avoided: {ref_bytes / 2**20:.1f} MiB, "
          f"max |Δ log p| = {max_diff:.2e} ({args.device}, {args.size}, {n} pairs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
