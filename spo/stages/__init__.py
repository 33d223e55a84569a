"""Pipeline stages. Each module has `run(cfg, ...)` (the logic) and `main(argv)` (the dvc/CLI entry).

The same names are used in `dvc.yaml`, here, and in `components/`.
"""

STAGES = ("prepare", "validate", "train_spm", "train_spo", "train_dpo", "evaluate", "register")
