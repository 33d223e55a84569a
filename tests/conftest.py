"""Shared fixtures: an isolated MLflow store, Pick-a-Pic-format pairs, a tiny LoRA, tiny digits params.

Every test runs with MLFLOW_TRACKING_URI pointing at a temporary sqlite file, so nothing ever writes
to the repository's mlflow.db or mlruns/.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent

# A few-minute version of the digits profile for end-to-end tests (DVC / KFP / CLI).
TINY_DIGITS_OVERRIDES = {
    "prepare": {"num_pairs": 40, "vae_train_steps": 20, "unet_train_steps": 20, "backbone_train_steps": 10,
                "train_batch_size": 32},
    "validate": {"min_rows": 10, "max_tie_fraction": 0.9},
    "train_spm": {"preference_steps": 5, "max_steps": 5, "warmup_steps": 1, "batch_size": 4},
    "train_spo": {"num_epochs": 1, "max_prompts": 4, "prompts_per_round": 2, "prompts_per_rollout": 2,
                  "pairs_per_step": 2, "pairs_per_batch": 2, "num_inference_steps": 6, "branch_start_step": 1,
                  "threshold": 0.0},  # the barely-trained tiny SPM rarely clears 0.3: keep pairs so SPO steps
    "train_dpo": {"max_steps": 2, "pairs_per_step": 4, "pairs_per_batch": 4},
    "learning_curve": {"points": 1, "num_prompts": 2, "num_inference_steps": 4},
    "evaluate": {"num_prompts": 4, "seeds": [0], "num_inference_steps": 4, "grid_prompts": 2, "bootstrap_resamples": 200},
}


def digits_config(**sections: dict):
    """The digits profile with some keys replaced, section by section (a nested mapping such as
    prepare={"oracle": {...}} replaces that whole sub-section): digits_config(validate={"min_rows": 10}).
    The config has no defaults, so a test that needs a Config builds it from a profile, like this."""
    from spo.config import config_from_dict

    data = yaml.safe_load((REPO_ROOT / "profiles" / "digits.yaml").read_text())
    for section, values in sections.items():
        data[section] = {**data[section], **values} if isinstance(values, dict) else values
    return config_from_dict(data)


def tiny_digits_params() -> dict:
    """params.yaml (digits) with TINY_DIGITS_OVERRIDES merged in, section by section."""
    data = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for section, values in TINY_DIGITS_OVERRIDES.items():
        data[section] = {**data[section], **values}
    return data


# ----------------------------------------------------------------------------------------------------
# MLflow


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory) -> Path:
    """An empty, migrated MLflow sqlite store (migrations take seconds; copying it takes none)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path_factory, monkeypatch):
    """Every test: a throwaway tracking URI and no inherited parent run."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path_factory.getbasetemp() / 'default-mlflow.db'}")
    monkeypatch.delenv("SPO_PARENT_RUN_ID", raising=False)
    monkeypatch.setenv("GX_ANALYTICS_ENABLED", "false")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # stage subprocesses on a shared CPU (see spo/cli.py)
    yield
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run():
            mlflow.end_run()
        mlflow.set_tracking_uri(None)  # stage_tracker sets the global URI; it outranks the env of later tests


@pytest.fixture
def mlflow_db(tmp_path, monkeypatch, _mlflow_template_db) -> str:
    """A fresh sqlite store for this test; the tracking URI is set to it. Returns the URI."""
    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


# ----------------------------------------------------------------------------------------------------
# Pick-a-Pic-format pairs


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def good_pairs_frame(n: int = 24) -> pd.DataFrame:
    """n valid rows with the Pick-a-Pic v1 columns (a quarter of them ties)."""
    label_0 = np.array([1.0, 0.0, 0.5, 1.0] * n)[:n]
    return pd.DataFrame({
        "are_different": [True] * n,
        "best_image_uid": [f"img-{i}-a" for i in range(n)],
        "caption": [f"a handwritten digit {i % 10}" for i in range(n)],
        "created_at": pd.to_datetime(["2024-01-01"] * n),
        "has_label": [True] * n,
        "image_0_uid": [f"img-{i}-a" for i in range(n)],
        "image_0_url": [""] * n,
        "image_1_uid": [f"img-{i}-b" for i in range(n)],
        "image_1_url": [""] * n,
        "jpg_0": [jpeg_bytes(2 * i) for i in range(n)],
        "jpg_1": [jpeg_bytes(2 * i + 1) for i in range(n)],
        "label_0": label_0,
        "label_1": 1.0 - label_0,
        "model_0": ["digits"] * n,
        "model_1": ["digits"] * n,
        "ranking_id": np.arange(n, dtype=np.int64),
        "user_id": np.zeros(n, dtype=np.int64),
        "num_example_per_prompt": np.ones(n, dtype=np.int64),
    })


@pytest.fixture
def write_pairs(tmp_path):
    """write_pairs(frame) -> path of a parquet file holding it."""
    counter = iter(range(1000))

    def write(frame: pd.DataFrame) -> Path:
        path = tmp_path / f"pairs-{next(counter)}.parquet"
        frame.to_parquet(path, index=False)
        return path

    return write


# ----------------------------------------------------------------------------------------------------
# a tiny LoRA in diffusers `save_lora_weights` format


@pytest.fixture(scope="session")
def tiny_lora(tmp_path_factory) -> tuple[Path, Path]:
    """(base pipeline dir, lora dir): a tiny SD pipeline and a non-zero LoRA on its attention."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tiny_models import build_tiny_sd

    root = tmp_path_factory.mktemp("tiny_lora")
    base = build_tiny_sd(root / "base")
    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    gen = torch.Generator().manual_seed(0)
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.1  # B = 0 would be a no-op adapter
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    lora_dir = root / "spo" / "lora"
    StableDiffusionPipeline.save_lora_weights(str(lora_dir), unet_lora_layers=layers, safe_serialization=True)
    return base, lora_dir
