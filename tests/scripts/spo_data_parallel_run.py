"""Run by tests/test_spo_resume_and_processes.py under `accelerate launch --num_processes N`: SPO on the
tiny SD model in this process's share; rank 0 saves the LoRA parameters and the history."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_spo_resume_and_processes import RUN_CFG, RUN_PROMPTS, scorer_for  # noqa: E402

from spo.models.diffusion_model import load_diffusion_model  # noqa: E402
from spo.models.lora import add_lora  # noqa: E402
from spo.tracking.tracker import MemoryTracker  # noqa: E402
from spo.training.distributed import current_processes  # noqa: E402
from spo.training.spo_trainer import SPORunOptions, train_spo  # noqa: E402


def main(model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    processes = current_processes()
    model = load_diffusion_model(model_dir)
    torch.manual_seed(0)
    params = add_lora(model.unet, RUN_CFG)
    history = train_spo(model, scorer_for, RUN_PROMPTS, params, RUN_CFG, resolution=16, seed=0,
                        tracker=MemoryTracker(), options=SPORunOptions(processes=processes))
    if processes.is_main:
        torch.save({"params": [p.detach() for p in params], "history": history,
                    "world_size": processes.world_size}, out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
