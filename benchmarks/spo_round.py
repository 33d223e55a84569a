"""Benchmark: SPO rounds (sampling with branching and SPM scoring, then training on the kept pairs), our
structure against the published one, identical maths, random-init models of the real classes.

ours:      the K candidates' x̂0 of all prompts decoded and scored in one batch per scored step; training:
           one policy and one reference call per micro-batch (win and lose share x_t), the reference is the
           UNet with its LoRA disabled.
published: the published loop's cost (RockeyCoss/SPO, ../shared/reference/spo-reference.md 3.2-3.3, 5.1):
           every candidate decoded and scored on its own; training: four UNet calls per micro-batch
           (policy/reference x win/lose, each at CFG batch 2), the reference a frozen copy of the UNet
           (fp16 on CUDA, as published; the policy's dtype on CPU so both structures compute the same numbers).
The noise draws are the same, so both keep the same pairs and compute the same losses
(tests/test_spo_round_benchmark.py checks it on CPU).

Prints a table and writes JSON: seconds per round, kept pairs/s, prompts/s, the breakdown (sampling UNet,
x̂0 decode, SPM, policy fwd+bwd, reference fwd, optimizer), peak memory, the fraction of the UNet ceiling
(the same UNet work at batch-32 throughput) and the projected recipe GPU-hours on this device. On CPU the
models are the tiny stand-ins (spo/standins) and only ratios mean anything; absolute times need a GPU.

    python benchmarks/spo_round.py --device cpu                       # seconds; both structures and their ratio
    python benchmarks/spo_round.py --device cuda --arch sd15 --prompts 10 --candidates 4 --rounds 2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from spo.config import load_profile
from spo.diffusion.ddim import ddim_step, gaussian_log_prob
from spo.diffusion.guidance import guided_noise_pred
from spo.diffusion.sampling import latent_shape
from spo.models.diffusion_model import SDXL, DiffusionModel, load_diffusion_model
from spo.models.lora import add_lora
from spo.models.scoring_decoder import tiny_decoder_like
from spo.models.step_aware_preference_model import StepAwarePreferenceModel
from spo.training.spo_loss import spo_loss
from spo.training.spo_trainer import autocast_for, pair_log_probs, rollout_settings
from spo.training.step_sampling import initial_latents, prompt_generators, rollout_pairs

RECIPE_PROMPT_PASSES = 4000 * 10  # the SD1.5 recipe: 4,000 prompts x 10 epochs
STRUCTURES = ("ours", "published")


class Clock:
    """Wall seconds per phase, synchronising CUDA around each measured block."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    @contextlib.contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] += time.perf_counter() - start


@dataclasses.dataclass
class PerCandidateDecode(DiffusionModel):
    """The published rollout's decode: one VAE call per candidate image."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([DiffusionModel.decode_latents(self, x[None]) for x in latents])


def tiny_models(arch: str, root: Path) -> tuple[DiffusionModel, StepAwarePreferenceModel]:
    """The CPU size: the stand-ins of the real classes and configs, random init (spo/standins)."""
    from spo.standins.models import build_pickscore, build_sd15, build_sdxl

    base = (build_sd15 if arch == "sd15" else build_sdxl)(root / arch)
    return load_diffusion_model(str(base)), StepAwarePreferenceModel.from_backbone(str(build_pickscore(root / "spm")))


CLIP_VOCAB = 49408  # the published CLIP tokenizers' vocabulary: the parameter counts below are at this size
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def special_ids(tokenizer) -> dict[str, int]:
    """A text tower's special ids from its tokenizer (the pooled output finds EOS by id)."""
    return {name: getattr(tokenizer, name) for name in SPECIAL_IDS}


def sd15_unet_config() -> dict:
    """stable-diffusion-v1-5's unet/config.json: the class defaults are its blocks (320/640/1280/1280, 2 layers
    per block), the rest is this. 859,520,964 parameters."""
    return {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}


def sdxl_unet_config() -> dict:
    """stabilityai/stable-diffusion-xl-base-1.0's unet/config.json (its non-default keys). 2,567,463,684 parameters."""
    return {"sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],  # heads, in diffusers' naming
            "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816}  # 2 x 1280 pooled text + 6 x 256 time ids


def vae_config(*, sample_size: int, scaling_factor: float, **extra) -> dict:
    """SD's AutoencoderKL (SD1.5 and SDXL share its shape: 128/256/512/512, 2 layers per block, 8x down, 4 latent
    channels). 83,653,863 parameters."""
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
            "layers_per_block": 2, "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4, "sample_size": sample_size, "scaling_factor": scaling_factor,
            **extra}


def sd15_vae_config() -> dict:
    return vae_config(sample_size=512, scaling_factor=0.18215)


def sdxl_vae_config() -> dict:
    """stable-diffusion-xl-base-1.0's vae/config.json with madebyollin/sdxl-vae-fp16-fix's force_upcast (False:
    the profile's VAE decodes in the run's dtype)."""
    return vae_config(sample_size=1024, scaling_factor=0.13025, force_upcast=False)


def clip_l_text_config(vocab_size: int = CLIP_VOCAB, **ids: int):
    """openai/clip-vit-large-patch14's text tower (SD1.5's text_encoder, SDXL's first). 123,060,480 parameters
    at vocab 49408."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                          num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", **ids)


def openclip_bigg_text_config(vocab_size: int = CLIP_VOCAB, **ids: int):
    """OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's text_encoder_2). 694,659,840 parameters at
    vocab 49408."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                          num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                          **ids)


def pickscore_clip_config(vocab_size: int = CLIP_VOCAB, **ids: int):
    """A ViT-H/14 CLIP, PickScore's backbone (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's shape)."""
    from transformers import CLIPConfig

    vision = {"image_size": 224, "patch_size": 14, "hidden_size": 1280, "intermediate_size": 5120,
              "num_hidden_layers": 32, "num_attention_heads": 16, "hidden_act": "gelu"}
    text = {"vocab_size": vocab_size, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "max_position_embeddings": 77, "hidden_act": "gelu", **ids}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024)


def ddim_scheduler():
    """DDIM as both SD1.5's and SDXL base's scheduler configs set it up (what load_diffusion_model builds)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def real_spm(tokenizer) -> StepAwarePreferenceModel:
    """The SPM on a ViT-H/14 CLIP (PickScore's size) with PickScore's processor, random init."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor

    from spo.standins.models import PICKSCORE_PROCESSOR

    clip = CLIPModel(pickscore_clip_config(len(tokenizer), **special_ids(tokenizer)))
    return StepAwarePreferenceModel(clip, CLIPProcessor(image_processor=CLIPImageProcessor(**PICKSCORE_PROCESSOR),
                                                        tokenizer=tokenizer))


def real_models(arch: str, device: torch.device, dtype: torch.dtype) -> tuple[DiffusionModel, StepAwarePreferenceModel]:
    """SD1.5 or SDXL at its real size, random init: UNet/VAE/text encoder(s) of stable-diffusion-v1-5's or
    stable-diffusion-xl-base-1.0's configs, an SPM on a ViT-H/14 CLIP (PickScore's backbone), built in memory
    (no downloads). The text towers use the stand-in tokenizer's (smaller) vocabulary."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from spo.standins.models import _tokenizer

    tokenizer = _tokenizer()
    torch.manual_seed(0)
    if arch == "sd15":  # built on the CPU, then moved
        unet = UNet2DConditionModel(**sd15_unet_config())
        vae = AutoencoderKL(**sd15_vae_config())
        text = CLIPTextModel(clip_l_text_config(len(tokenizer), **special_ids(tokenizer)))
        model = DiffusionModel(unet=unet.to(device, dtype), vae=vae.to(device, dtype),
                               text_encoder=text.to(device, dtype), tokenizer=tokenizer, scheduler=ddim_scheduler())
        return model, real_spm(tokenizer).to(device)
    if arch != "sdxl":
        raise SystemExit(f"--size real: unknown arch {arch!r}")
    tokenizer_2 = _tokenizer(pad_token="!")  # as SDXL's tokenizer_2 (and spo.standins.models.build_sdxl)
    with torch.device(device):  # built where it runs: ~3.4 B parameters are slow to initialise on a CPU
        unet = UNet2DConditionModel(**sdxl_unet_config())
        vae = AutoencoderKL(**sdxl_vae_config())
        text = CLIPTextModel(clip_l_text_config(len(tokenizer), **special_ids(tokenizer)))
        text_2 = CLIPTextModelWithProjection(openclip_bigg_text_config(len(tokenizer_2), **special_ids(tokenizer_2)))
        spm = real_spm(tokenizer)
    model = DiffusionModel(unet=unet.to(dtype), vae=vae.to(dtype), text_encoder=text.to(dtype), tokenizer=tokenizer,
                           scheduler=ddim_scheduler(), architecture=SDXL, text_encoder_2=text_2.to(dtype),
                           tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True)
    return model, spm.to(device)


@dataclasses.dataclass(frozen=True)
class OursOptions:
    """train_spo's speed options, applied to `ours` only. channels_last and decode_batch_size keep the maths;
    a scoring decoder (fast scoring) changes what the SPM sees, so the pairs no longer match `published`."""

    channels_last: bool = False
    decode_batch_size: int | None = None
    scoring_decoder: torch.nn.Module | None = None

    def describe(self) -> dict:
        return {"channels_last": self.channels_last, "decode_batch_size": self.decode_batch_size,
                "scoring_decoder": None if self.scoring_decoder is None else type(self.scoring_decoder).__name__}


def with_structure(model: DiffusionModel, structure: str, options: OursOptions) -> DiffusionModel:
    """The model as `structure` runs it: published decodes per candidate with the VAE, in the default memory
    format; ours with its options (channels-last, the fast scoring decoder)."""
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(DiffusionModel)}
    fields["scoring_decoder"] = options.scoring_decoder if structure == "ours" else None
    model = PerCandidateDecode(**fields) if structure == "published" else DiffusionModel(**fields)
    channels_last = structure == "ours" and options.channels_last
    model.to_memory_format(torch.channels_last if channels_last else torch.contiguous_format)
    return model


def published_log_probs(unet, reference, scheduler, pairs, cond, uncond, cfg, clock: Clock):
    """Four calls: the policy on win and on lose (with grad), the frozen copy on win and on lose."""
    out = []
    lose_t = pairs.latents_t if pairs.latents_t_lose is None else pairs.latents_t_lose  # MSPO: the loser's own x_t
    for net, grad, phase in ((unet, True, "policy_forward"), (reference, False, "reference_forward")):
        for x_t, target in ((pairs.latents_t, pairs.latents_win), (lose_t, pairs.latents_lose)):
            with clock.phase(phase), torch.set_grad_enabled(grad):
                eps = guided_noise_pred(net, x_t, pairs.timesteps, cond, uncond, cfg.guidance_scale)
                step = ddim_step(scheduler, eps.float(), pairs.timesteps, x_t.float(), cfg.eta)
                out.append(gaussian_log_prob(target.float(), step.mean, step.sigma))
    return out


def ours_log_probs(model, pairs, cond, uncond, cfg, clock: Clock):
    """pair_log_probs (one policy and one LoRA-disabled reference call), timed as a whole: its reference
    call is the cheaper part, split off by the forward share measured in `published`."""
    with clock.phase("policy_and_reference_forward"):
        lp = pair_log_probs(model, pairs, cond, uncond, cfg)
    return [lp.policy_win, lp.policy_lose, lp.ref_win, lp.ref_lose]


class UNetCounter:
    """Counts the samples each UNet forward sees (CFG doubles them), to size the ceiling comparison."""

    def __init__(self, *unets) -> None:
        self.samples = 0
        self.handles = [unet.register_forward_pre_hook(self._count, with_kwargs=True) for unet in unets]

    def _count(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        self.samples += sample.shape[0]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def one_round(model: DiffusionModel, spm: StepAwarePreferenceModel, reference, structure: str, prompts: list[str],
              cfg, resolution: int, seed: int, params, clock: Clock, options: OursOptions = OursOptions()) -> dict:
    """One round: rollout of `prompts` (K candidates each), then one optimizer step per `pairs_per_batch`."""
    text = spm.encode_text(prompts)
    # ours: the stage's autocast (bf16 on CUDA, none on CPU); published: none (its LoRA run casts the UNet to fp16)
    autocast = autocast_for(cfg, model.device) if structure == "ours" else contextlib.nullcontext

    def score(images, prompt_index, timesteps):
        with clock.phase("spm"):
            if structure == "published":  # one candidate at a time
                return torch.cat([spm.score(images[i:i + 1].float(), text[prompt_index[i:i + 1]], timesteps[i:i + 1].long())
                                  for i in range(len(images))])
            return spm.score(images.float(), text[prompt_index], timesteps.long())

    model = with_structure(model, structure, options)
    if structure == "ours":
        cfg = dataclasses.replace(cfg, decode_batch_size=options.decode_batch_size)
    # timed and counted on this round's own model object (with_structure made it): nothing to restore
    decode, vae_calls = model.decode_for_scoring, [0]  # the VAE (published: per candidate) or the scoring decoder

    def timed_decode(latents):
        with clock.phase("decode"):
            return decode(latents)

    def counted_vae_decode(latents, *args, **kwargs):
        vae_calls[0] += 1
        return vae_decode(latents, *args, **kwargs)

    model.decode_for_scoring = timed_decode
    vae_decode = model.vae.decode
    model.vae.decode = counted_vae_decode  # an instance attribute over the class's method, removed below
    try:
        cond, uncond = model.encode_prompts(prompts, resolution), model.encode_negative(resolution)
        generators = prompt_generators([seed * 1000 + i for i in range(len(prompts))])
        shape = latent_shape(model, resolution)
        counter = UNetCounter(model.unet, reference)
        with clock.phase("sampling"), autocast():
            pairs, stats = rollout_pairs(model, cond, uncond, rollout_settings(cfg), score,
                                         initial_latents(generators, shape).to(model.device), generators)
        sampling_samples = counter.samples
    finally:
        del model.vae.decode
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    losses, log_probs = [], []
    for micro in torch.arange(len(pairs)).split(cfg.pairs_per_batch):
        batch = pairs.select(micro.to(pairs.timesteps.device))
        c = cond[batch.prompt_index]
        with clock.phase("training"), autocast():
            lp = (published_log_probs(model.unet, reference, model.scheduler, batch, c, uncond, cfg, clock)
                  if structure == "published" else ours_log_probs(model, batch, c, uncond, cfg, clock))
            out = spo_loss(*lp, beta=cfg.beta, clip_eps=cfg.clip_eps)
            with clock.phase("policy_backward"):
                out.loss.backward()
            with clock.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        log_probs.append([x.detach().double().sum().item() for x in lp])  # policy win/lose, reference win/lose
    counter.close()
    return {"pairs": pairs, "losses": losses, "log_probs": log_probs, "kept": len(pairs), "scored": stats.num_candidates_scored,
            "sampling_unet_samples": sampling_samples, "training_unet_samples": counter.samples - sampling_samples,
            "vae_decode_calls": vae_calls[0]}


def unet_ceiling(unet, cond, batch: int, shape: tuple[int, ...], device: torch.device, repeats: int = 3
                 ) -> tuple[float, float]:
    """Samples/s of the UNet (with its LoRA) at `batch`: forward (no grad) and forward+backward."""
    x = torch.randn(batch, *shape, device=device, dtype=unet.dtype)
    t = torch.full((batch,), 500, device=device)
    hidden = cond.hidden_states[:1].expand(batch, -1, -1).to(unet.dtype)
    kwargs = {} if cond.pooled is None else {"added_cond_kwargs": {
        "text_embeds": cond.pooled[:1].expand(batch, -1).to(unet.dtype),
        "time_ids": cond.time_ids[:1].expand(batch, -1).to(unet.dtype)}}
    clock = Clock(device)
    for name, grad in (("forward", False), ("forward_backward", True)):
        for i in range(repeats + 1):
            with clock.phase(name if i else "warmup"), torch.set_grad_enabled(grad):
                out = unet(x, t, encoder_hidden_states=hidden, **kwargs).sample
                if grad:
                    out.float().mean().backward()
    return batch * repeats / clock.seconds["forward"], batch * repeats / clock.seconds["forward_backward"]


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    profile = load_profile(args.arch, require_implemented=False)
    cfg = dataclasses.replace(profile.train_spo, num_candidates=args.candidates, threshold=args.threshold,
                              num_inference_steps=args.steps, pairs_per_batch=args.pairs_per_batch)
    with tempfile.TemporaryDirectory() as tmp:
        model, spm = (tiny_models(args.arch, Path(tmp)) if args.size == "tiny" else real_models(args.arch, device, dtype))
    model = dataclasses.replace(model, unet=model.unet.to(device), vae=model.vae.to(device),
                                text_encoder=model.text_encoder.to(device))
    if model.text_encoder_2 is not None:
        model = dataclasses.replace(model, text_encoder_2=model.text_encoder_2.to(device))
    spm = spm.to(device).eval().requires_grad_(False)
    resolution = args.resolution or model.default_resolution
    frozen = copy.deepcopy(model.unet).requires_grad_(False).eval()  # the published reference, made before the LoRA
    if device.type == "cuda":
        frozen = frozen.half()
    params = add_lora(model.unet, cfg)
    scoring_decoder = None
    if args.scoring_decoder == "tiny":  # TAESD's size at real size (random init: speed only); toy width on tiny
        torch.manual_seed(1)
        scoring_decoder = tiny_decoder_like(model.vae, channels=64 if args.size == "real" else 8).to(device, dtype)
    options = OursOptions(args.channels_last, args.decode_batch, scoring_decoder)
    initial = {id(p): p.detach().clone() for p in params}
    prompts = [f"a photo of object {i} in a garden, detailed, {i % 3} lights" for i in range(args.prompts)]
    results = {}
    for structure in args.structures:
        clock = Clock(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rounds = []
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is not counted
            with torch.no_grad():  # every round of every structure starts from the same LoRA: comparable pairs
                for p in params:
                    p.copy_(initial[id(p)])
            c = clock if r else Clock(device)
            with c.phase("round"):
                rounds.append(one_round(model, spm, frozen, structure, prompts, cfg, resolution, seed=r, params=params,
                                        clock=c, options=options))
        counted = rounds[1:]
        seconds = {k: v / args.rounds for k, v in clock.seconds.items()}
        sampling_unet = seconds["sampling"] - seconds.get("decode", 0.0) - seconds.get("spm", 0.0)
        kept = sum(r["kept"] for r in counted) / args.rounds
        results[structure] = {
            "seconds_per_round": seconds["round"], "kept_pairs_per_round": kept,
            "kept_pairs_per_second": kept / seconds["round"], "prompts_per_second": args.prompts / seconds["round"],
            "breakdown_s": {"sampling_unet": sampling_unet, "x0_decode": seconds.get("decode", 0.0),
                            "spm": seconds.get("spm", 0.0),
                            # ours: pair_log_probs makes both calls; timed together, under policy_forward
                            "policy_forward": seconds.get("policy_forward", seconds.get("policy_and_reference_forward", 0.0)),
                            "reference_forward": seconds.get("reference_forward") if structure == "published" else None,
                            "policy_backward": seconds.get("policy_backward", 0.0),
                            "optimizer": seconds.get("optimizer", 0.0)},
            "unet_samples_per_round": {"sampling": counted[-1]["sampling_unet_samples"],
                                       "training": counted[-1]["training_unet_samples"]},
            "candidates_scored_per_round": counted[-1]["scored"],
            "vae_decode_calls_per_round": counted[-1]["vae_decode_calls"],
            "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "projected_recipe_gpu_hours": RECIPE_PROMPT_PASSES / args.prompts * seconds["round"] / 3600,
            "losses": [loss for r in counted for loss in r["losses"]],
            "log_prob_sums": [lp for r in counted for lp in r["log_probs"]],
            "pairs": [{"timesteps": r["pairs"].timesteps.tolist(), "prompt_index": r["pairs"].prompt_index.tolist(),
                       "latents_win_sum": r["pairs"].latents_win.double().sum().item(),
                       "latents_lose_sum": r["pairs"].latents_lose.double().sum().item()} for r in counted],
        }
    cond = model.encode_prompts(prompts[:1], resolution)
    forward_rate, train_rate = unet_ceiling(model.unet, cond, args.ceiling_batch, latent_shape(model, resolution), device)
    for res in results.values():
        work = res["unet_samples_per_round"]
        ideal = work["sampling"] / forward_rate + work["training"] / 2 / train_rate  # half the training calls need grad
        res["ceiling_fraction"] = ideal / res["seconds_per_round"]
    out = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "arch": args.arch, "size": args.size, "resolution": resolution, "prompts": args.prompts,
           "candidates": args.candidates, "steps": args.steps, "threshold": args.threshold, "rounds": args.rounds,
           "ours_options": options.describe(), "same_maths": options.scoring_decoder is None,
           "unet_ceiling_samples_per_s": {"forward": forward_rate, "forward_backward": train_rate,
                                          "batch": args.ceiling_batch},
           "structures": results}
    if {"ours", "published"} <= set(results):
        out["speedup_ours_vs_published"] = results["published"]["seconds_per_round"] / results["ours"]["seconds_per_round"]
    return out


def table(out: dict) -> str:
    rows = [("structure", "s/round", "kept pairs/s", "prompts/s", "UNet(sample)", "x0 decode", "SPM", "policy fwd",
             "ref fwd", "backward", "optim", "ceiling", "recipe GPU-h")]
    shown = lambda v: "(in policy)" if v is None else f"{v:.3f}"  # noqa: E731
    for name, r in out["structures"].items():
        b = r["breakdown_s"]
        rows.append((name, f"{r['seconds_per_round']:.3f}", f"{r['kept_pairs_per_second']:.2f}",
                     f"{r['prompts_per_second']:.2f}", *(shown(b[k]) for k in ("sampling_unet", "x0_decode", "spm",
                     "policy_forward", "reference_forward", "policy_backward", "optimizer")),
                     f"{r['ceiling_fraction']:.1%}", f"{r['projected_recipe_gpu_hours']:.1f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows]
    if "speedup_ours_vs_published" in out:
        on = [f"{k}={v}" for k, v in out["ours_options"].items() if v not in (None, False)]
        lines.append(f"ours vs published: {out['speedup_ours_vs_published']:.2f}x round throughput "
                     f"({out['device']}, {out['arch']} {out['size']}, {out['prompts']} prompts x k={out['candidates']}"
                     f"{'; ours with ' + ', '.join(on) if on else ''})")
        if not out["same_maths"]:
            lines.append("fast scoring: the SPM scores the tiny decoder's images, so ours keeps other pairs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=("tiny", "real"), default=None, help="default: tiny on cpu, real on cuda")
    parser.add_argument("--structure", choices=(*STRUCTURES, "both"), default="both")
    parser.add_argument("--prompts", type=int, default=None, help="per round (default: 2 on cpu, 10 on cuda)")
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 10 on cpu, 20 on cuda)")
    parser.add_argument("--threshold", type=float, default=0.0, help="0 keeps every pair (the costliest training)")
    parser.add_argument("--pairs-per-batch", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1, help="measured rounds, after one warm-up round")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--ceiling-batch", type=int, default=None, help="default: 8 on cpu, 32 on cuda")
    parser.add_argument("--channels-last", action="store_true", help="ours: UNet, VAE (and decoder) channels-last")
    parser.add_argument("--decode-batch", type=int, default=None, help="ours: x̂0 images per decode call")
    parser.add_argument("--scoring-decoder", choices=("vae", "tiny"), default="vae",
                        help="ours: tiny = a TAESD-layout AutoencoderTiny decodes what the SPM scores (changes pairs)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.size = args.size or ("real" if cuda else "tiny")
    args.prompts = args.prompts or (10 if cuda else 2)
    args.steps = args.steps or (20 if cuda else 10)
    args.ceiling_batch = args.ceiling_batch or (32 if cuda else 8)
    args.structures = STRUCTURES if args.structure == "both" else (args.structure,)
    out = run(args)
    print(table(out))
    write_json(out, args.out)
    return out


def write_json(out: dict, path: Path | None) -> None:
    """The benchmark's result as JSON at `path` (none: printed only)."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
