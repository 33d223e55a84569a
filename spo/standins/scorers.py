"""Tiny random-init stand-ins of the five evaluation scorers, in the published layouts (DESIGN 2).

    DIR/pickscore/model/      CLIPModel (PickScore_v1's class; `spo.standins.models.build_pickscore`)
    DIR/pickscore/processor/  CLIPProcessor (laion ViT-H's: 224 bicubic, CLIP mean/std, pads with "!")
    DIR/hpsv21/               HPS_v2.1_compressed.pt ({"state_dict": fp16, "module."-prefixed open_clip names}) +
                              open_clip config JSON + tokenizer/ (CLIP BPE, pads with "!" as open_clip's 0)
    DIR/imagereward/          ImageReward.pt (ImageReward's own key names) + med_config.json (BERT keys) +
                              vocab.txt (BERT wordpiece) + vision_config.json (the tiny ViT; the real repo has none)
    DIR/aesthetic/clip/       CLIPModel with projection_dim 768 (OpenAI ViT-L/14's embedding size, QuickGELU)
    DIR/aesthetic/sac+logos+ava1-l14-linearMSE.pth   the head, keys layers.{0,2,4,6,7}.* (fp32, 3 MB: the
                              published head's shape, fixed by the 768-d embedding)
    DIR/clip_score/           CLIPModel + CLIPProcessor (openai/clip-vit-large-patch14's classes and processor)

Same classes and key layouts as the published files, at toy width, so `load_scorer` takes the very code path
it takes with the real weights, on a CPU, in seconds. Weights are seeded random: scores are noise; only shapes,
plumbing and the score formulas are meaningful. Tokenizers are real and offline: the HF CLIP stand-ins use the
project's CLIP BPE (`spo.standins.models._tokenizer`: prompt words are one token, anything else falls back to
characters), HPS the same BPE padded with "!" (open_clip pads with id 0), and ImageReward a BERT wordpiece vocab of the prompt words plus single characters. Each scorer's dir is
written to a temporary sibling and renamed into place.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel, CLIPProcessor

from spo.atomic_write import atomic_dir
from spo.evaluation.scorers.base import ScorerSource, linear_head
from spo.standins.models import PICKSCORE_PROCESSOR, _text_config, _tokenizer, _words, build_pickscore

AESTHETIC_HEAD = "sac+logos+ava1-l14-linearMSE.pth"
HPS_FILE = "HPS_v2.1_compressed.pt"
HPS_CONFIG = "open_clip_config.json"
# open_clip ViT-H-14's config shape at toy width (GELU as HPS); the text vocab is the stand-in tokenizer's
HPS_ARCH = {"embed_dim": 16,
            "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 2}}
# BLIP ViT (vision_config.json, BlipVisionConfig keys) and med BERT (med_config.json, BERT keys) at toy width
IR_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 16, "layer_norm_eps": 1e-6, "hidden_act": "gelu"}
IR_TEXT_HIDDEN = 16
IR_EMBED = 8  # vision_proj/text_proj width (real: 256)
BERT_SPECIALS = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0-103


def _spread(module: torch.nn.Module) -> torch.nn.Module:
    """Variance-preserving weights (std 1/sqrt(fan_in)), LayerNorms that differ from one another, and ViT
    embeddings of a trained ViT's scale. The library inits leave a random ImageReward blind (BlipVisionConfig's
    initializer_range is 1e-10 and its final LayerNorm weight 0, so every image gives the same features), a
    random linear head scoring every pair alike (it shrinks its input 3x a layer), and every LayerNorm the
    identity (so a key mapped onto the wrong LayerNorm would go unseen)."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                torch.nn.init.normal_(layer.weight, std=layer.weight[0].numel() ** -0.5)
            elif isinstance(layer, torch.nn.LayerNorm):
                torch.nn.init.normal_(layer.weight, mean=1.0, std=0.2)
                torch.nn.init.normal_(layer.bias, std=0.2)
        for name, param in module.named_parameters():
            if name.endswith(("class_embedding", "position_embedding")):
                torch.nn.init.normal_(param, std=0.02)  # timm ViT's trunc_normal(std=.02)
    return module


def _clip_vision(hidden_act: str) -> dict:
    return {"image_size": 224, "patch_size": 32, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_act": hidden_act}


def _openai_clip(out_dir: Path, projection_dim: int) -> None:
    """A CLIPModel + CLIPProcessor dir shaped like openai/clip-vit-large-patch14 (QuickGELU, pads with EOS)."""
    tokenizer = _tokenizer()
    text = _text_config(tokenizer, 32, hidden_act="quick_gelu").to_dict()
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=_clip_vision("quick_gelu"),
                                 projection_dim=projection_dim))
    from transformers import CLIPImageProcessor

    processor = CLIPProcessor(image_processor=CLIPImageProcessor(**PICKSCORE_PROCESSOR), tokenizer=tokenizer)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)


def build_pickscore_standin(out_dir: Path, seed: int = 0) -> ScorerSource:
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        build_pickscore(tmp / "model", seed)
        CLIPProcessor.from_pretrained(tmp / "model").save_pretrained(tmp / "processor")
    return ScorerSource(model=str(out_dir / "model"), processor=str(out_dir / "processor"))


def open_clip_state_dict(model) -> dict[str, torch.Tensor]:
    """A transformers CLIPModel's weights under open_clip's names: the inverse of hpsv2.to_transformers (q/k/v
    packed into in_proj, projections transposed), i.e. the layout of the published HPS checkpoints."""
    from spo.evaluation.scorers.hpsv2 import _BLOCK, _PROJECTIONS, _TOP

    sd = model.state_dict()
    out = {ours: sd[theirs] for ours, theirs in _TOP.items()}
    out.update({ours: sd[theirs].t().contiguous() for ours, theirs in _PROJECTIONS.items()})
    for tower, prefix, cfg in (("visual.", "vision_model", model.config.vision_config),
                               ("", "text_model", model.config.text_config)):
        for n in range(cfg.num_hidden_layers):
            layer = f"{prefix}.encoder.layers.{n}."
            block = f"{tower}transformer.resblocks.{n}."
            for kind in ("weight", "bias"):
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                    [sd[f"{layer}self_attn.{q}_proj.{kind}"] for q in "qkv"])
                for theirs, ours in _BLOCK:
                    out[f"{block}{theirs}{kind}"] = sd[f"{layer}{ours}{kind}"]
    return out


def build_hps_standin(out_dir: Path, seed: int = 0) -> ScorerSource:
    """HPS_v2.1_compressed.pt's layout ({"state_dict": fp16, "module."-prefixed open_clip names}) of a toy
    ViT-H-14-shaped CLIP, its open_clip config JSON, and a CLIP tokenizer."""
    from transformers import CLIPModel

    from spo.evaluation.scorers.hpsv2 import clip_config

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(pad_token="!")
    arch = {**HPS_ARCH, "text_cfg": {**HPS_ARCH["text_cfg"], "vocab_size": len(tokenizer)}}
    model = _spread(CLIPModel(clip_config(arch, tokenizer)))
    with atomic_dir(out_dir) as tmp:
        (tmp / HPS_CONFIG).write_text(json.dumps(arch, indent=2) + "\n")
        sd = {f"module.{k}": v.half() for k, v in open_clip_state_dict(model).items()}
        torch.save({"state_dict": sd}, tmp / HPS_FILE)
        tokenizer.save_pretrained(tmp / "tokenizer")
    return ScorerSource(model=str(out_dir), file=HPS_FILE, arch=str(out_dir / HPS_CONFIG),
                        tokenizer=str(out_dir / "tokenizer"))


def bert_vocab() -> list[str]:
    """BERT's special ids (0-103, as bert-base-uncased), single characters alone and as `##` pieces, prompt words."""
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    return [*BERT_SPECIALS, *chars, *(f"##{c}" for c in chars), *(w for w in _words() if w not in chars)]


def imagereward_state_dict(vision, text, mlp, vision_proj, text_proj) -> dict[str, torch.Tensor]:
    """The modules' weights under ImageReward.pt's key names (the inverse of the loader's remap)."""
    from spo.evaluation.scorers.imagereward import original_key

    sd = {original_key("vision", k): v for k, v in vision.state_dict().items()}
    sd.update({original_key("text", k): v for k, v in text.state_dict().items()})
    sd["blip.text_encoder.embeddings.position_ids"] = text.embeddings.position_ids.clone()
    sd.update({f"blip.vision_proj.{k}": v for k, v in vision_proj.state_dict().items()})
    sd.update({f"blip.text_proj.{k}": v for k, v in text_proj.state_dict().items()})
    sd.update({original_key("mlp", k): v for k, v in mlp.state_dict().items()})
    return sd


def build_imagereward_standin(out_dir: Path, seed: int = 0) -> ScorerSource:
    from transformers import BlipTextModel, BlipVisionConfig, BlipVisionModel

    from spo.evaluation.scorers.imagereward import text_config

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    vocab = bert_vocab()
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "hidden_size": IR_TEXT_HIDDEN, "initializer_range": 0.02,
           "intermediate_size": 2 * IR_TEXT_HIDDEN, "layer_norm_eps": 1e-12, "max_position_embeddings": 40,
           "model_type": "bert", "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 0,
           "type_vocab_size": 2, "vocab_size": len(vocab) + 2,  # + BLIP's [DEC] and [ENC], as 30522 + 2
           "bos_token_id": len(vocab), "sep_token_id": vocab.index("[SEP]"),
           "encoder_width": 768, "add_cross_attention": True}
    vision = _spread(BlipVisionModel(BlipVisionConfig(**IR_VISION)))
    text = _spread(BlipTextModel(text_config(med, IR_VISION["hidden_size"]), add_pooling_layer=False))
    sd = imagereward_state_dict(vision, text, _spread(linear_head(IR_TEXT_HIDDEN)),
                                torch.nn.Linear(IR_VISION["hidden_size"], IR_EMBED),
                                torch.nn.Linear(IR_TEXT_HIDDEN, IR_EMBED))
    with atomic_dir(out_dir) as tmp:
        torch.save(sd, tmp / "ImageReward.pt")
        (tmp / "med_config.json").write_text(json.dumps(med, indent=2) + "\n")
        (tmp / "vision_config.json").write_text(json.dumps(IR_VISION, indent=2) + "\n")
        (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return ScorerSource(model=str(out_dir), file="ImageReward.pt", tokenizer=str(out_dir))


def build_aesthetic_standin(out_dir: Path, seed: int = 0) -> ScorerSource:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with atomic_dir(out_dir) as tmp:
        _openai_clip(tmp / "clip", projection_dim=768)
        head = _spread(linear_head(768))
        with torch.no_grad():  # unit-norm input: scale it up so scores spread by about 1, around 5 (AVA's range)
            head[0].weight.mul_(768 ** 0.5)
            head[7].bias.fill_(5.0)
        torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, tmp / AESTHETIC_HEAD)
    return ScorerSource(model=str(out_dir / "clip"), file=str(out_dir / AESTHETIC_HEAD))


def build_clip_score_standin(out_dir: Path, seed: int = 0) -> ScorerSource:
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    with atomic_dir(out_dir) as tmp:
        _openai_clip(tmp, projection_dim=16)
    return ScorerSource(model=str(out_dir))


BUILDERS = {"pickscore": build_pickscore_standin, "hpsv21": build_hps_standin,
            "imagereward": build_imagereward_standin, "aesthetic": build_aesthetic_standin,
            "clip_score": build_clip_score_standin}


def build_scorer_standins(out_dir: Path, seed: int = 0) -> dict[str, ScorerSource]:
    """Write every scorer's stand-in under out_dir/<name>/ and return the ScorerSource pointing at each."""
    out_dir = Path(out_dir)
    return {name: build(out_dir / name, seed) for name, build in BUILDERS.items()}


__all__ = ["BUILDERS", "build_scorer_standins"]
