"""Pipeline stages. Each module has `run(cfg, ...)` (the logic) and `main(argv)` (the dvc/CLI entry).

The same names are used in `dvc.yaml`, here, and in `components/`.
"""

STAGES = ("prepare", "validate", "train_spm", "train_spo", "train_dpo", "evaluate", "register")

# The config sections each stage reads: what `dvc.yaml` lists as its params (whole sections here), plus
# `tracking` (its MLflow experiment). KFP hands each stage only these (spo.config.config_view), so a
# stage's cache key changes exactly when something that shapes its output does: a sweep over
# train_spo.beta reuses prepare, validate, train_spm and train_dpo.
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "prepare": ("profile", "torch_threads", "seed", "model", "prepare", "tracking"),
    "validate": ("profile", "torch_threads", "validate", "tracking"),
    "train_spm": ("profile", "torch_threads", "seed", "model", "train_spm", "tracking"),
    "train_spo": ("profile", "torch_threads", "seed", "model", "train_spo", "learning_curve", "tracking"),
    "train_dpo": ("profile", "torch_threads", "seed", "model", "train_dpo", "learning_curve", "tracking"),
    "evaluate": ("profile", "torch_threads", "seed", "model", "prepare", "evaluate", "tracking"),
    "register": ("profile", "torch_threads", "seed", "model", "evaluate", "register", "tracking"),
}
