"""The evaluation scorers (spo.evaluation.scorers) on their tiny stand-ins (spo.standins.scorers).

Every score is checked against an independent computation from the stand-in's own files: the model loaded
directly, images preprocessed here from the uint8 array, checkpoint keys named here by hand.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from spo.evaluation.scorers import (
    AESTHETIC_HEAD_SHA256,
    AESTHETIC_HEAD_URL,
    PUBLISHED_SOURCES,
    SCORER_NAMES,
    Scorer,
    ScorerSource,
    base,
    load_scorer,
    resolve_file,
)

torch.set_num_threads(1)

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
PROMPTS = ["a red cube on a table", "a painting of a city at night, detailed", "photo of a zebra riding a bicycle"]
LONG_PROMPT = " ".join(["a detailed painting of a red cube under a golden sky with snow"] * 10)  # > 77 tokens


def _image(seed: int, h: int, w: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [_image(0, 64, 64), _image(1, 48, 80), _image(2, 90, 40)]  # square, landscape, portrait


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, ScorerSource]:
    from spo.standins.scorers import build_scorer_standins

    return build_scorer_standins(tmp_path_factory.mktemp("scorer_standins"))


@pytest.fixture(scope="module")
def scorers(sources) -> dict:
    return {name: load_scorer(name, sources[name], batch_size=2) for name in SCORER_NAMES}


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """OpenAI CLIP's preprocess written out: shortest side to `size` (bicubic, PIL), centre crop, mean/std."""
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    resized = image.resize(new, Image.BICUBIC)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    array = np.asarray(resized.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
    return torch.from_numpy(((array - MEAN) / STD).transpose(2, 0, 1).copy())


def clip_towers(model_dir: str, processor_dir: str | None = None):
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(processor_dir or model_dir)
    return model, tokenizer


@torch.no_grad()
def clip_embeds(model, tokenizer, prompts, images, size: int = 224):
    px = torch.stack([clip_pixels(im, size) for im in images])
    tx = tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    i = model.get_image_features(pixel_values=px).pooler_output
    t = model.get_text_features(input_ids=tx["input_ids"], attention_mask=tx["attention_mask"]).pooler_output
    return i, t


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return ((a / a.norm(dim=-1, keepdim=True)) * (b / b.norm(dim=-1, keepdim=True))).sum(-1)


# ----------------------------------------------------------------------------------------------------
# every scorer


@pytest.mark.parametrize("name", SCORER_NAMES)
def test_each_scorer_loads_from_its_standin_and_scores_every_pair(name, scorers):
    scorer = scorers[name]
    assert isinstance(scorer, Scorer) and scorer.name == name
    scores = scorer.score(PROMPTS, IMAGES)
    assert scores.shape == (3,) and scores.dtype == torch.float64 and scores.device.type == "cpu"
    assert torch.isfinite(scores).all()
    one_by_one = torch.cat([scorer.score([p], [im]) for p, im in zip(PROMPTS, IMAGES)])
    torch.testing.assert_close(scores, one_by_one, rtol=1e-5, atol=1e-5)  # batching does not mix pairs
    assert scorer.score([], []).shape == (0,)
    assert torch.isfinite(scorer.score([LONG_PROMPT], IMAGES[:1])).all()  # truncated by the tokenizer
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        scorer.score(PROMPTS[:2], IMAGES)


def test_published_sources_name_the_published_files():
    assert set(PUBLISHED_SOURCES) == set(SCORER_NAMES)
    assert PUBLISHED_SOURCES["pickscore"] == ScorerSource(
        model="yuvalkirstain/PickScore_v1", processor="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert PUBLISHED_SOURCES["hpsv21"] == ScorerSource(model="xswu/HPSv2", file="HPS_v2.1_compressed.pt",
                                                       arch="ViT-H-14", tokenizer="laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert PUBLISHED_SOURCES["imagereward"] == ScorerSource(model="THUDM/ImageReward", file="ImageReward.pt",
                                                            tokenizer="bert-base-uncased")
    assert PUBLISHED_SOURCES["aesthetic"].model == "openai/clip-vit-large-patch14"
    assert PUBLISHED_SOURCES["aesthetic"].file == AESTHETIC_HEAD_URL
    assert AESTHETIC_HEAD_URL.startswith("https://") and "sac%2Blogos%2Bava1-l14-linearMSE.pth" in AESTHETIC_HEAD_URL
    assert base.KNOWN_SHA256[AESTHETIC_HEAD_URL] == AESTHETIC_HEAD_SHA256
    assert PUBLISHED_SOURCES["clip_score"] == ScorerSource(model="openai/clip-vit-large-patch14")


# ----------------------------------------------------------------------------------------------------
# PickScore


def test_pickscore_is_logit_scale_times_cosine(sources, scorers):
    src = sources["pickscore"]
    model, tokenizer = clip_towers(src.model, src.processor)
    assert model.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)  # PickScore_v1's trained scale
    i, t = clip_embeds(model, tokenizer, PROMPTS, IMAGES)
    expected = (model.logit_scale.exp() * cosine(i, t)).double()
    torch.testing.assert_close(scorers["pickscore"].score(PROMPTS, IMAGES), expected, rtol=1e-5, atol=1e-4)


def test_clip_images_go_through_the_pil_pipeline(scorers):
    # the processor's pixels equal OpenAI's preprocess computed here from the uint8 array (PIL resize, not
    # transformers 5's torchvision default)
    for name in ("pickscore", "aesthetic", "clip_score"):
        got = scorers[name].clip.pixel_values(IMAGES)
        torch.testing.assert_close(got, torch.stack([clip_pixels(im, 224) for im in IMAGES]), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# aesthetic


def _aesthetic_head(path: str) -> torch.nn.Sequential:
    sd = torch.load(path, weights_only=True)
    assert sorted(sd) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    assert sd["layers.0.weight"].shape == (1024, 768)
    layers = [torch.nn.Linear(768, 1024), torch.nn.Linear(1024, 128), torch.nn.Linear(128, 64),
              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)]
    for layer, i in zip(layers, (0, 2, 4, 6, 7)):
        layer.load_state_dict({"weight": sd[f"layers.{i}.weight"], "bias": sd[f"layers.{i}.bias"]})
    return torch.nn.Sequential(*layers)


@torch.no_grad()
def test_aesthetic_scores_the_normalised_embedding(sources, scorers):
    src = sources["aesthetic"]
    model, tokenizer = clip_towers(src.model)
    head = _aesthetic_head(src.file)
    e, _ = clip_embeds(model, tokenizer, PROMPTS, IMAGES)
    assert e.shape == (3, 768)
    scores = scorers["aesthetic"].score(PROMPTS, IMAGES)
    torch.testing.assert_close(scores, head(e / e.norm(dim=-1, keepdim=True)).squeeze(-1).double(),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(scores, head(e).squeeze(-1).double(), rtol=1e-3, atol=1e-3)
    # prompts are not used
    torch.testing.assert_close(scorers["aesthetic"].score(["x", "y", "z"], IMAGES), scores)


@torch.no_grad()
def test_aesthetic_is_invariant_to_the_embedding_scale(sources):
    scorer = load_scorer("aesthetic", sources["aesthetic"])
    before = scorer.score(PROMPTS, IMAGES)
    scorer.clip.model.visual_projection.weight.mul_(7.0)
    torch.testing.assert_close(scorer.score(PROMPTS, IMAGES), before, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# CLIP score


@torch.no_grad()
def test_clip_score_is_100_cosine_clamped_per_sample(sources, scorers):
    src = sources["clip_score"]
    model, tokenizer = clip_towers(src.model)
    i, t = clip_embeds(model, tokenizer, PROMPTS, IMAGES)
    raw = 100 * cosine(i, t).double()
    torch.testing.assert_close(scorers["clip_score"].score(PROMPTS, IMAGES), raw.clamp(min=0), rtol=1e-5, atol=1e-4)
    assert scorers["clip_score"].backbone == src.model

    flipped = load_scorer("clip_score", src)
    flipped.clip.model.text_projection.weight.neg_()  # every cosine changes sign
    torch.testing.assert_close(flipped.score(PROMPTS, IMAGES), (-raw).clamp(min=0), rtol=1e-5, atol=1e-4)
    assert (flipped.score(PROMPTS, IMAGES) == 0).sum() == (raw > 0).sum() > 0

    # a text projection under which the batch's cosines have both signs: clamped pair by pair, not on the mean
    mixed = load_scorer("clip_score", src, batch_size=3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        weight = torch.randn(model.text_projection.weight.shape, generator=gen)
        model.text_projection.weight.copy_(weight)
        raw = 100 * cosine(*clip_embeds(model, tokenizer, PROMPTS, IMAGES)).double()
        if (raw > 1).any() and (raw < -1).any():
            break
    assert (raw > 1).any() and (raw < -1).any()
    mixed.clip.model.text_projection.weight.copy_(weight)
    scores = mixed.score(PROMPTS, IMAGES)
    torch.testing.assert_close(scores, raw.clamp(min=0), rtol=1e-5, atol=1e-4)
    assert ((scores == 0) == (raw < 0)).all()


def test_clip_score_takes_uint8_images_and_refuses_floats(scorers):
    scorer = scorers["clip_score"]
    arrays = [np.array(im) for im in IMAGES]
    torch.testing.assert_close(scorer.score(PROMPTS, arrays), scorer.score(PROMPTS, IMAGES))
    torch.testing.assert_close(scorer.score(PROMPTS, [torch.from_numpy(a) for a in arrays]),
                               scorer.score(PROMPTS, IMAGES))
    with pytest.raises(TypeError, match="uint8"):
        scorer.score(PROMPTS[:1], [arrays[0].astype(np.float32) / 255])
    rgba = IMAGES[0].convert("RGBA")  # converted to RGB, not scored with 4 channels
    torch.testing.assert_close(scorer.score(PROMPTS[:1], [rgba]), scorer.score(PROMPTS[:1], IMAGES[:1]))


# ----------------------------------------------------------------------------------------------------
# ImageReward

IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072


def imagereward_name(part: str, key: str) -> str:
    """ImageReward.pt's name of a transformers key, by hand (BLIP vit.py names)."""
    if part == "text":
        return "blip.text_encoder." + key
    if part == "mlp":
        return "mlp.layers." + key
    fixed = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
             "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
             "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
             "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"}
    if key in fixed:
        return "blip.visual_encoder." + fixed[key]
    n, rest = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key).groups()
    rest = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
            "self_attn.projection": "attn.proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[rest.rsplit(".", 1)[0]] \
        + "." + rest.rsplit(".", 1)[1]
    return f"blip.visual_encoder.blocks.{n}.{rest}"


@pytest.fixture(scope="module")
def imagereward_case(sources, tmp_path_factory):
    """A tiny ImageReward written here (own modules, own key names), and those modules."""
    from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

    standin = Path(sources["imagereward"].model)
    med = json.loads((standin / "med_config.json").read_text())
    vision_cfg = json.loads((standin / "vision_config.json").read_text())
    torch.manual_seed(123)
    vision = BlipVisionModel(BlipVisionConfig(**vision_cfg)).eval()
    text = BlipTextModel(BlipTextConfig(
        vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], intermediate_size=med["intermediate_size"],
        num_hidden_layers=med["num_hidden_layers"], num_attention_heads=med["num_attention_heads"],
        max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
        encoder_hidden_size=vision_cfg["hidden_size"], is_decoder=True, bos_token_id=None, sep_token_id=None),
        add_pooling_layer=False).eval()
    head = torch.nn.Sequential(torch.nn.Linear(med["hidden_size"], 1024), torch.nn.Dropout(0.2),
                               torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2), torch.nn.Linear(128, 64),
                               torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1)).eval()
    # weights that let prompt and image both move the score (BLIP's vision init is 1e-10, its final LayerNorm
    # weight 0), and LayerNorms that differ, so that a key mapped onto the wrong LayerNorm shows
    with torch.no_grad():
        for module in (vision, text, head):
            for param_name, param in module.named_parameters():
                if "LayerNorm" in param_name or "layer_norm" in param_name or "layernorm" in param_name:
                    param.normal_(mean=1.0 if param_name.endswith("weight") else 0.0, std=0.2)
                elif param.dim() >= 2 or "embedding" in param_name:
                    param.normal_(std=param[0].numel() ** -0.5)
    sd = {}
    for part, module in (("vision", vision), ("text", text), ("mlp", head)):
        sd.update({imagereward_name(part, k): v for k, v in module.state_dict().items()})
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"])[None]
    sd["blip.vision_proj.weight"], sd["blip.vision_proj.bias"] = torch.zeros(8, vision_cfg["hidden_size"]), torch.zeros(8)
    sd["blip.text_proj.weight"], sd["blip.text_proj.bias"] = torch.zeros(8, med["hidden_size"]), torch.zeros(8)
    root = tmp_path_factory.mktemp("imagereward_case")
    for name in ("med_config.json", "vision_config.json", "vocab.txt"):
        shutil.copy(standin / name, root / name)
    torch.save(sd, root / "ImageReward.pt")
    return root, sd, vision, text, head


@torch.no_grad()
def test_imagereward_remap_loads_the_published_layout_and_scores_as_blip(imagereward_case):
    from transformers import BertTokenizer

    root, _, vision, text, head = imagereward_case
    scorer = load_scorer("imagereward", ScorerSource(model=str(root), file="ImageReward.pt", tokenizer=str(root)))
    size = json.loads((root / "vision_config.json").read_text())["image_size"]
    px = torch.stack([clip_pixels(im, size) for im in IMAGES])
    torch.testing.assert_close(scorer.pixel_values(IMAGES), px, rtol=0, atol=1e-6)
    tok = BertTokenizer(str(root / "vocab.txt"))
    prompts = [*PROMPTS[:2], LONG_PROMPT]  # the long one is cut at 35 tokens
    ids = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert ids["input_ids"].shape == (3, 35) and (ids["input_ids"][:, 0] == tok.cls_token_id).all()
    assert tok.unk_token_id not in ids["input_ids"]  # real prompt text tokenises (words or characters)
    img = vision(pixel_values=px).last_hidden_state
    cls = text(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], encoder_hidden_states=img,
               encoder_attention_mask=torch.ones(img.shape[:-1], dtype=torch.long)).last_hidden_state[:, 0]
    expected = ((head(cls) - IR_MEAN) / IR_STD).squeeze(-1).double()
    torch.testing.assert_close(scorer.score(prompts, IMAGES), expected, rtol=1e-5, atol=1e-5)
    # both the image (through the cross-attention) and the prompt move the reward
    one_prompt, one_image = scorer.score(PROMPTS[:1] * 3, IMAGES), scorer.score(PROMPTS, IMAGES[:1] * 3)
    assert one_prompt.std() > 0.01 and one_image.std() > 0.01


def test_imagereward_checkpoint_keys_are_checked(imagereward_case, tmp_path):
    root, sd, *_ = imagereward_case
    for name in ("med_config.json", "vision_config.json", "vocab.txt"):
        shutil.copy(root / name, tmp_path / name)
    src = ScorerSource(model=str(tmp_path), file="ImageReward.pt", tokenizer=str(tmp_path))
    for key in ("blip.visual_encoder.blocks.1.norm2.weight", "blip.text_encoder.encoder.layer.0.crossattention.self.key.weight",
                "mlp.layers.7.bias"):
        torch.save({k: v for k, v in sd.items() if k != key}, tmp_path / "ImageReward.pt")
        with pytest.raises(KeyError, match=re.escape(key)):
            load_scorer("imagereward", src)
    torch.save({**sd, "blip.itm_head.weight": torch.zeros(2)}, tmp_path / "ImageReward.pt")
    with pytest.raises(KeyError, match="blip.itm_head.weight"):
        load_scorer("imagereward", src)


def test_imagereward_standin_and_configs_follow_the_published_files(sources):
    from spo.evaluation.scorers.imagereward import IR_VISION, text_config

    sd = torch.load(Path(sources["imagereward"].model) / "ImageReward.pt", weights_only=True)
    prefixes = {re.match(r"(blip\.[a-z_]+|mlp)\.", k).group(1) for k in sd}
    assert prefixes == {"blip.visual_encoder", "blip.text_encoder", "blip.vision_proj", "blip.text_proj", "mlp"}
    for key in ("blip.visual_encoder.cls_token", "blip.visual_encoder.blocks.1.attn.qkv.bias",
                "blip.visual_encoder.norm.weight", "blip.text_encoder.embeddings.position_ids",
                "blip.text_encoder.encoder.layer.1.crossattention.output.LayerNorm.bias", "mlp.layers.6.weight"):
        assert key in sd, key
    published_med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
                     "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
                     "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
                     "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0,
                     "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True}
    cfg = text_config(published_med, IR_VISION["hidden_size"])
    assert (cfg.encoder_hidden_size, cfg.num_attention_heads, cfg.vocab_size, cfg.is_decoder) == (1024, 12, 30524, True)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.layer_norm_eps) == (768, 12, 3072, 1e-12)
    assert IR_VISION == {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                         "num_attention_heads": 16, "image_size": 224, "patch_size": 16, "layer_norm_eps": 1e-6,
                         "hidden_act": "gelu"}


# ----------------------------------------------------------------------------------------------------
# HPSv2.1


def letterbox_by_hand(image: Image.Image, size: int) -> torch.Tensor:
    t = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    h, w = t.shape[1:]
    nh, nw = round(h * size / max(h, w)), round(w * size / max(h, w))
    t = torch.nn.functional.interpolate(t[None], size=(nh, nw), mode="bicubic", antialias=True,
                                        align_corners=False)[0]
    out = torch.zeros(3, size, size)
    top, left = (size - nh) // 2, (size - nw) // 2
    out[:, top:top + nh, left:left + nw] = t
    return (out - torch.from_numpy(MEAN)[:, None, None]) / torch.from_numpy(STD)[:, None, None]


def test_hps_letterboxes_without_cropping(scorers):
    scorer = scorers["hpsv21"]
    size = scorer.image_size
    portrait = IMAGES[2]  # 90 x 40 (h x w): resized to 28 x 12, 8 black columns each side
    got = scorer.pixel_values([portrait])[0]
    torch.testing.assert_close(got, letterbox_by_hand(portrait, size), rtol=0, atol=1e-5)
    black = ((0 - torch.from_numpy(MEAN)) / torch.from_numpy(STD))[:, None, None]
    nw = round(40 * size / 90)
    pad = (size - nw) // 2
    assert pad > 0
    torch.testing.assert_close(got[:, :, :pad], black.expand(3, size, pad))
    torch.testing.assert_close(got[:, :, pad + nw:], black.expand(3, size, size - pad - nw))
    assert not torch.allclose(got[:, :, pad:pad + nw], black.expand(3, size, nw))
    torch.testing.assert_close(scorer.pixel_values(IMAGES[1:2])[0], letterbox_by_hand(IMAGES[1], size), rtol=0,
                               atol=1e-5)


def open_clip_forward(sd: dict, cfg: dict, px: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's CLIP forward written out from its state dict (an independent re-derivation of the port):
    pre-LN residual blocks with packed in_proj attention, class-token ViT, causal text pooled at argmax(ids)."""
    F = torch.nn.functional

    def ln(x, name):
        return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"])

    def blocks(x, prefix, layers, heads, mask):
        for n in range(layers):
            p = f"{prefix}.{n}."
            h = ln(x, p + "ln_1")
            q, k, v = (h @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]).chunk(3, dim=-1)
            split = [t.reshape(*t.shape[:2], heads, -1).transpose(1, 2) for t in (q, k, v)]
            a = F.scaled_dot_product_attention(*split, attn_mask=mask).transpose(1, 2).reshape(x.shape)
            x = x + a @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
            h = F.gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
            x = x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]
        return x

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    x = F.conv2d(px, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], dim=1) + sd["visual.positional_embedding"]
    x = blocks(ln(x, "visual.ln_pre"), "visual.transformer.resblocks", v["layers"], v["width"] // v["head_width"], None)
    image = ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]
    length = ids.shape[1]
    causal = torch.full((length, length), float("-inf")).triu(1)
    y = blocks(sd["token_embedding.weight"][ids] + sd["positional_embedding"], "transformer.resblocks", t["layers"],
               t["heads"], causal)
    text = ln(y, "ln_final")[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    return image, text


@torch.no_grad()
def test_hps_is_100_cosine_of_the_open_clip_network_and_ignores_a_module_prefix(sources, scorers, tmp_path):
    from spo.evaluation.scorers.hpsv2 import load_checkpoint

    src = sources["hpsv21"]
    ckpt = torch.load(Path(src.model) / src.file, weights_only=True)
    assert set(ckpt) == {"state_dict"}
    assert all(k.startswith("module.") and v.dtype == torch.float16 for k, v in ckpt["state_dict"].items())
    bare = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    torch.save({"state_dict": bare}, tmp_path / "hps_bare.pt")
    unprefixed = load_scorer("hpsv21", ScorerSource(model=str(tmp_path), file="hps_bare.pt", arch=src.arch,
                                                    tokenizer=src.tokenizer))
    scorer = scorers["hpsv21"]
    scores = scorer.score(PROMPTS, IMAGES)
    torch.testing.assert_close(unprefixed.score(PROMPTS, IMAGES), scores, rtol=0, atol=1e-4)  # fp32 x 100

    sd = {k: v.float() for k, v in load_checkpoint(Path(src.model) / src.file).items()}
    px = torch.stack([letterbox_by_hand(im, scorer.image_size) for im in IMAGES])
    ids = scorer.token_ids(PROMPTS)
    assert (ids.argmax(-1) == (ids == scorer.tokenizer.eos_token_id).int().argmax(-1)).all()  # EOT is the max id
    image, text = open_clip_forward(sd, json.loads(Path(src.arch).read_text()), px, ids)
    expected = 100 * cosine(image, text).double()
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-4)
    assert scores.std() > 0.1  # the stand-in tells the pairs apart


@torch.no_grad()
def test_hps_port_matches_open_clip_itself_where_installed(sources, scorers, tmp_path):
    """open_clip needs torchvision (not installed with the CPU torch build): this runs on GPU stacks only.
    Measured when it was installed (torch 2.14.1, open_clip 3.3.0): max |diff| 7e-6 on the x100 scale."""
    open_clip = pytest.importorskip("open_clip")
    from spo.evaluation.scorers.hpsv2 import load_checkpoint

    src = sources["hpsv21"]
    (tmp_path / "spo-parity-hps.json").write_text(Path(src.arch).read_text())
    open_clip.add_model_config(tmp_path / "spo-parity-hps.json")
    model = open_clip.create_model("spo-parity-hps", pretrained=None)
    model.load_state_dict(load_checkpoint(Path(src.model) / src.file))
    model.float().eval()
    scorer = scorers["hpsv21"]
    px = torch.stack([letterbox_by_hand(im, scorer.image_size) for im in IMAGES])
    ids = scorer.token_ids(PROMPTS)
    expected = 100 * cosine(model.encode_image(px), model.encode_text(ids)).double()
    torch.testing.assert_close(scorer.score(PROMPTS, IMAGES), expected, rtol=1e-5, atol=1e-4)


def test_hps_checkpoint_keys_are_checked_both_ways(sources, tmp_path):
    from spo.evaluation.scorers.hpsv2 import load_checkpoint

    src = sources["hpsv21"]
    sd = load_checkpoint(Path(src.model) / src.file)
    for broken, match in (({**sd, "visual.extra": sd["logit_scale"]}, "visual.extra"),
                          ({k: v for k, v in sd.items() if k != "ln_final.bias"}, "final_layer_norm.bias")):
        torch.save({"state_dict": broken}, tmp_path / "hps.pt")
        with pytest.raises(KeyError, match=re.escape(match)):
            load_scorer("hpsv21", ScorerSource(model=str(tmp_path), file="hps.pt", arch=src.arch,
                                               tokenizer=src.tokenizer))


def test_hps_arch_is_vit_h_14_or_an_open_clip_config(sources):
    from spo.evaluation.scorers.hpsv2 import VIT_H_14, clip_config, open_clip_config

    assert open_clip_config("ViT-H-14") is VIT_H_14
    tokenizer = load_scorer("hpsv21", sources["hpsv21"]).tokenizer
    cfg = clip_config(VIT_H_14, tokenizer)  # the published network's shape, 986 M parameters in open_clip
    v, t = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size, v.patch_size,
            v.hidden_act) == (1280, 32, 16, 5120, 14, "gelu")
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.vocab_size, cfg.projection_dim) == \
        (1024, 24, 16, 49408, 1024)
    with pytest.raises(ValueError, match="ViT-L-14"):
        open_clip_config("ViT-L-14")


# ----------------------------------------------------------------------------------------------------
# errors and files


def test_unknown_scorer_name_is_named_with_the_choices(sources):
    with pytest.raises(ValueError, match="'pickscor'") as err:
        load_scorer("pickscor", sources["pickscore"])
    assert all(name in str(err.value) for name in SCORER_NAMES)


def test_missing_files_are_named(sources, tmp_path):
    hps_dir = sources["hpsv21"].model
    with pytest.raises(FileNotFoundError, match=re.escape(str(Path(hps_dir) / "HPS_v9.pt"))):
        load_scorer("hpsv21", ScorerSource(model=hps_dir, file="HPS_v9.pt", arch=sources["hpsv21"].arch))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        load_scorer("clip_score", ScorerSource(model=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "head.pth"))):
        load_scorer("aesthetic", ScorerSource(model=sources["aesthetic"].model, file=str(tmp_path / "head.pth")))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "laion"))):
        load_scorer("pickscore", ScorerSource(model=sources["pickscore"].model, processor=str(tmp_path / "laion")))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "ImageReward.pt"))):
        load_scorer("imagereward", ScorerSource(model=str(tmp_path), tokenizer=sources["imagereward"].tokenizer))
    shutil.copy(Path(sources["imagereward"].model) / "ImageReward.pt", tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "med_config.json"))):
        load_scorer("imagereward", ScorerSource(model=str(tmp_path), tokenizer=sources["imagereward"].tokenizer))


def test_resolve_file_prefers_the_model_dir_for_a_bare_name(tmp_path, monkeypatch):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "w.pt").write_text("in model")
    (tmp_path / "cwd").mkdir()
    (tmp_path / "cwd" / "w.pt").write_text("in cwd")
    monkeypatch.chdir(tmp_path / "cwd")
    assert resolve_file(str(tmp_path / "model"), "w.pt").read_text() == "in model"
    assert resolve_file("some-org/some-repo", "w.pt").read_text() == "in cwd"  # an existing path wins over the hub
    assert resolve_file(str(tmp_path / "model"), str(tmp_path / "cwd" / "w.pt")).read_text() == "in cwd"


def test_https_files_download_once_atomically_and_are_checked(tmp_path, monkeypatch):
    import hashlib
    import urllib.request

    payload = b"head weights" * 1000
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setenv("SPO_CACHE_DIR", str(tmp_path / "cache"))
    url = "https://example.invalid/some/dir/sac%2Bhead.pth"
    monkeypatch.setitem(base.KNOWN_SHA256, url, "0" * 64)
    with pytest.raises(ValueError, match="sha256"):
        resolve_file("openai/clip-vit-large-patch14", url)
    assert list((tmp_path / "cache").iterdir()) == []  # nothing half-written left behind

    monkeypatch.setitem(base.KNOWN_SHA256, url, hashlib.sha256(payload).hexdigest())
    path = resolve_file("openai/clip-vit-large-patch14", url)
    assert path.read_bytes() == payload and path.parent == tmp_path / "cache" and path.name.endswith("sac+head.pth")
    assert resolve_file("openai/clip-vit-large-patch14", url) == path
    assert len(calls) == 2  # the failed try and one download: the second resolve used the cache
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]

    path.write_bytes(b"corrupt")  # a cached copy is checked on every use
    with pytest.raises(ValueError, match="delete it"):
        resolve_file("openai/clip-vit-large-patch14", url)


def test_standins_are_small_and_rebuilt_in_place(sources, tmp_path):
    from spo.standins.scorers import build_clip_score_standin

    root = Path(sources["pickscore"].model).parents[1]
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(SCORER_NAMES)
    assert not [p for p in root.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 12 * 2**20
    first = build_clip_score_standin(tmp_path / "clip_score", seed=1)
    again = build_clip_score_standin(tmp_path / "clip_score", seed=1)  # replaces the dir whole
    assert first == again and (Path(again.model) / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
