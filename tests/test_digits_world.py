"""The embedded digits world: captions, tokenizer, images, oracle, backbone, Pick-a-Pic format."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from spo.config import OracleConfig, load_profile
from spo.data.pickapic import (
    PICKAPIC_SCHEMA,
    decode_image,
    encode_jpeg,
    read_pairs,
    write_pairs,
)
from spo.digits import backbone as backbone_lib
from spo.digits.base_model import build_scheduler
from spo.digits.captions import (
    EVAL_TEMPLATES,
    TRAIN_TEMPLATES,
    caption_digit,
    caption_words,
    eval_captions,
    prompt_records,
    train_captions,
)
from spo.digits.images import holdout_split, load_digit_images
from spo.digits.preference_oracle import (
    PreferenceOracle,
    aesthetic_score,
    aesthetic_terms,
)
from spo.digits.tokenizer import MODEL_MAX_LENGTH, build_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny ops run fastest on one thread, and busy-waiting OpenMP threads collapse on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits_data():
    return load_digit_images(16)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def oracle(digits_data):
    """The oracle as `prepare` trains it: on 80% of the real digits (the rest is held out)."""
    images, digits = digits_data
    train_idx, _ = holdout_split(len(images), 0.2, seed=42)
    return PreferenceOracle.train(images[train_idx], digits[train_idx],
                                  load_profile("digits").prepare.oracle, seed=42)


def binarised(images: torch.Tensor) -> torch.Tensor:
    """The ideal digit: every pixel full ink or clean background."""
    return torch.where(images.mean(dim=1, keepdim=True) > 0, 1.0, -1.0).expand_as(images).contiguous()


# ---------------------------------------------------------------------------------------------- captions

def test_every_caption_names_its_digit():
    for captions in (train_captions(), eval_captions()):
        assert [caption_digit(c) for c in captions] == [d for _ in range(len(captions) // 10) for d in range(10)]
    assert caption_digit("The Number SEVEN, handwritten") == 7


@pytest.mark.parametrize("caption", ["a cat driving a car", "someone wrote this", "one or two"])
def test_caption_without_exactly_one_digit_word_is_an_error_naming_it(caption):
    with pytest.raises(ValueError, match=caption):
        caption_digit(caption)


def test_eval_templates_are_held_out_and_prompt_records_have_the_spo_format():
    assert not set(TRAIN_TEMPLATES) & set(EVAL_TEMPLATES)
    assert not set(train_captions()) & set(eval_captions())
    records = prompt_records(eval_captions(), first_index=len(train_captions()))
    assert records[0] == {"caption": "a drawing of the number zero", "trainset_idx": len(train_captions())}
    assert len(records) == 10 * len(EVAL_TEMPLATES)


# --------------------------------------------------------------------------------------------- tokenizer

def test_every_caption_word_is_one_token_and_captions_round_trip(tokenizer):
    vocab = tokenizer.get_vocab()
    assert all(f"{w}</w>" in vocab for w in caption_words())
    for caption in train_captions() + eval_captions():
        ids = tokenizer(caption).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert len(ids) == len(caption.replace(",", " ,").split()) + 2
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ,", ",") == caption


def test_unknown_words_fall_back_to_characters(tokenizer):
    ids = tokenizer("a zebra").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "".join(tokens[2:-1]) == "zebra</w>" and len(tokens[2:-1]) > 1  # not a caption word: pieces
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a zebra"
    padded = tokenizer(["the digit one"], padding="max_length", max_length=tokenizer.model_max_length).input_ids[0]
    assert tokenizer.model_max_length == MODEL_MAX_LENGTH and len(padded) == MODEL_MAX_LENGTH


def test_tokenizer_survives_save_and_load(tokenizer, tmp_path):
    from transformers import CLIPTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    caption = "seven, written by hand"
    assert loaded(caption).input_ids == tokenizer(caption).input_ids
    assert loaded.model_max_length == MODEL_MAX_LENGTH


# ---------------------------------------------------------------------------------------------- images

def test_digit_images_follow_the_image_convention(digits_data):
    images, digits = digits_data
    assert images.shape == (1797, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert (images[:, :, 0, 0] == -1).float().mean() > 0.95  # dark background, bright ink
    assert torch.equal(torch.bincount(digits, minlength=10) > 170, torch.ones(10, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------- oracle

def test_aesthetic_of_hand_made_images(digits_data):
    images = digits_data[0][:64]
    ideal = binarised(images)
    noise = 0.3 * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    noisy = (images + noise).clamp(-1, 1)
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), value=-1.0), 3, stride=1)
    flat = {name: torch.full((2, 3, 16, 16), value) for name, value in [("blank", -1.0), ("white", 1.0), ("grey", 0.0)]}

    assert torch.allclose(aesthetic_score(ideal), torch.ones(64))
    for value in flat.values():
        assert torch.equal(aesthetic_score(value), torch.zeros(2))
    real, worse = aesthetic_score(images), {"noisy": aesthetic_score(noisy), "blurred": aesthetic_score(blurred)}
    assert 0.5 < real.mean() < 0.75
    for name, score in worse.items():
        assert score.mean() < real.mean() - 0.05, name
        assert (score < real).float().mean() > 0.75, name
    for term in aesthetic_terms(noisy).values():
        assert term.min() >= 0 and term.max() <= 1


def test_classifier_is_accurate_on_held_out_real_digits(oracle, digits_data):
    images, digits = digits_data
    _, holdout_idx = holdout_split(len(images), 0.2, seed=42)
    accuracy = (oracle.class_probabilities(images[holdout_idx]).argmax(1) == digits[holdout_idx]).float().mean()
    assert accuracy > 0.9
    alignment = oracle.alignment(images[holdout_idx], digits[holdout_idx])
    wrong = oracle.alignment(images[holdout_idx], (digits[holdout_idx] + 1) % 10)
    assert alignment.mean() > 0.85 and wrong.mean() < 0.05


def test_utility_and_preference_probability_follow_the_formula(oracle, digits_data):
    images, digits = digits_data[0][:32], digits_data[1][:32]
    cfg = OracleConfig(alignment_weight=2.0, aesthetic_weight=0.5, temperature=0.1, tie_margin=0.0)
    rater = PreferenceOracle(oracle.classifier, cfg)
    expected = 2.0 * oracle.alignment(images, digits) + 0.5 * aesthetic_score(images)
    assert torch.allclose(rater.utility(images, digits), expected)
    other = binarised(images)
    gap = rater.utility(images, digits) - rater.utility(other, digits)
    assert torch.allclose(rater.preference_probability(images, other, digits), torch.sigmoid(gap / 0.1))


def test_labels_are_ties_below_the_margin_and_otherwise_follow_the_utility(oracle, digits_data):
    images, digits = digits_data[0][:200], digits_data[1][:200]
    generator = torch.Generator().manual_seed(0)
    same_0, same_1 = oracle.label_pairs(images, images.clone(), digits, generator)
    assert torch.equal(same_0, torch.full((200,), 0.5, dtype=torch.float64)) and torch.equal(same_1, same_0)

    ideal = binarised(images)  # same digit, much better aesthetic: |u0 - u1| far above margin and temperature
    label_0, label_1 = oracle.label_pairs(ideal, images, digits, generator)
    assert set(label_0.tolist()) <= {0.0, 0.5, 1.0}
    assert torch.equal(label_0 + label_1, torch.ones(200, dtype=torch.float64))
    assert label_0.mean() > 0.9

    swapped_0, _ = oracle.label_pairs(images, ideal, digits, torch.Generator().manual_seed(0))
    again_0, _ = oracle.label_pairs(images, ideal, digits, torch.Generator().manual_seed(0))
    assert torch.equal(swapped_0, again_0)  # seeded generator: reproducible labels
    assert swapped_0.mean() < 0.1


def test_near_ties_are_labelled_ties(oracle, digits_data):
    images, digits = digits_data[0][:50], digits_data[1][:50]
    nudged = images.clone()
    nudged[:, :, 0, 0] = -0.99  # a background pixel barely changes: |u0 - u1| << tie_margin
    gap = (oracle.utility(images, digits) - oracle.utility(nudged, digits)).abs()
    assert gap.max() < oracle.config.tie_margin
    label_0, _ = oracle.label_pairs(images, nudged, digits, torch.Generator().manual_seed(1))
    assert torch.equal(label_0, torch.full((50,), 0.5, dtype=torch.float64))


def test_oracle_save_load_round_trip(oracle, digits_data, tmp_path):
    images, digits = digits_data[0][:40], digits_data[1][:40]
    loaded = PreferenceOracle.load(oracle.save(tmp_path / "oracle"))
    assert loaded.config == oracle.config
    assert torch.equal(loaded.utility(images, digits), oracle.utility(images, digits))
    with pytest.raises(FileNotFoundError, match="oracle.json"):
        PreferenceOracle.load(tmp_path / "nowhere")


def test_classifier_training_is_deterministic(digits_data):
    images, digits = digits_data[0][:256], digits_data[1][:256]
    oracle_cfg = load_profile("digits").prepare.oracle
    a = PreferenceOracle.train(images, digits, oracle_cfg, seed=3, steps=5)
    b = PreferenceOracle.train(images, digits, oracle_cfg, seed=3, steps=5)
    for (name, pa), pb in zip(a.classifier.state_dict().items(), b.classifier.state_dict().values()):
        assert torch.equal(pa, pb), name


# -------------------------------------------------------------------------------------------- backbone

def test_backbone_learns_digits_and_loads_like_pickscore(tokenizer, digits_data, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    images, digits = digits_data
    torch.manual_seed(0)
    model = backbone_lib.build_backbone(tokenizer, 16)
    before = backbone_lib.zero_shot_accuracy(model, tokenizer, images, digits)
    backbone_lib.train_backbone(model, tokenizer, images, digits, steps=300, batch_size=32, learning_rate=3e-3, seed=0)
    after = backbone_lib.zero_shot_accuracy(model, tokenizer, images, digits)
    assert after > 0.3 and after > before + 0.15

    out = backbone_lib.save_backbone(tmp_path / "clip", model, backbone_lib.build_processor(tokenizer, 16))
    loaded, processor = CLIPModel.from_pretrained(out), CLIPProcessor.from_pretrained(out)
    pil = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in images[:4]]
    inputs = processor(text=["the digit zero"] * 4, images=pil, padding="max_length", return_tensors="pt")
    assert inputs.pixel_values.shape == (4, 3, 16, 16)
    assert torch.allclose(inputs.pixel_values, backbone_lib.pixel_values(images[:4]), atol=0.02)
    with torch.no_grad():
        ours = model(input_ids=inputs.input_ids, pixel_values=inputs.pixel_values).logits_per_image
        theirs = loaded(**inputs).logits_per_image
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_scheduler_is_configured_like_sd15():
    config = build_scheduler().config
    assert (config.beta_start, config.beta_end, config.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (config.num_train_timesteps, config.steps_offset, config.timestep_spacing) == (1000, 1, "leading")
    assert config.clip_sample is False and config.set_alpha_to_one is False
    scheduler = build_scheduler()
    scheduler.set_timesteps(20)
    assert scheduler.timesteps[:3].tolist() == [951, 901, 851] and scheduler.timesteps[-1] == 1


# ------------------------------------------------------------------------------------- Pick-a-Pic format

def test_jpeg_round_trip_is_close(digits_data):
    image = digits_data[0][0]
    decoded = decode_image(encode_jpeg(image), 16)
    assert decoded.shape == (3, 16, 16) and decoded.dtype == torch.float32
    assert (decoded - image).abs().mean() < 0.03
    big = decode_image(encode_jpeg(F.interpolate(image[None], size=(40, 32))[0]), 16)
    assert big.shape == (3, 16, 16)


def test_undecodable_image_error_names_row_and_column():
    with pytest.raises(ValueError, match=r"row 7, column 'jpg_1'"):
        decode_image(b"not a jpeg at all", 16, row=7, column="jpg_1")


def _pairs_frame(n: int = 3) -> pd.DataFrame:
    jpg = encode_jpeg(torch.zeros(3, 16, 16))
    return pd.DataFrame({
        "are_different": [True] * n, "best_image_uid": ["a"] * n, "caption": ["the digit one"] * n,
        "created_at": [pd.Timestamp("2024-01-01")] * n, "has_label": [True] * n,
        "image_0_uid": ["a"] * n, "image_1_uid": ["b"] * n, "jpg_0": [jpg] * n, "jpg_1": [jpg] * n,
        "label_0": [1.0] * n, "label_1": [0.0] * n, "model_0": ["m"] * n, "model_1": ["m"] * n,
        "num_example_per_prompt": [n] * n, "ranking_id": list(range(n)), "user_id": [0] * n,
    })


def test_write_and_read_pairs_keep_the_pickapic_schema(tmp_path):
    import pyarrow.parquet as pq

    path = write_pairs(_pairs_frame(), tmp_path / "pairs.parquet")
    assert pq.read_schema(path).remove_metadata() == PICKAPIC_SCHEMA
    frame = read_pairs(path)
    assert len(frame) == 3 and frame["label_0"].dtype == "float64"


def test_read_pairs_missing_column_names_it_and_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    _pairs_frame().drop(columns=["label_1"]).to_parquet(path)
    with pytest.raises(ValueError, match=r"bad\.parquet.*label_1"):
        read_pairs(path)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        read_pairs(tmp_path / "missing.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"garbage\.parquet"):
        read_pairs(tmp_path / "garbage.parquet")
