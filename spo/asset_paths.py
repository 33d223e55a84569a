"""Where the checked-in assets live: `profiles/*.yaml` and `configs/accelerate/*.yaml`.

They sit at the repository root, beside `spo/`, not inside the package (dvc.yaml, the README and the
tests name them there). In a checkout or an editable install that root is `spo/..`; a non-editable
install (`pip install .`, the container image) puts `spo/` into site-packages, where `spo/..` holds no
profiles, so `config_from_dict` would refuse every profile name and every KFP component would fail. The
image therefore copies both directories to a fixed place and names it in $SPO_ASSET_ROOT
(`docker/install.sh` copies them there when that variable is set; the Dockerfile sets
SPO_ASSET_ROOT=/opt/spo-pipeline). Shipping them as package data instead would mean moving them under
`spo/`, which every reference to `profiles/` would have to follow.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

ASSET_ROOT_ENV = "SPO_ASSET_ROOT"
SOURCE_ROOT = Path(__file__).resolve().parent.parent  # the checkout, when `spo` is imported from one


def _holds_assets(root: Path) -> bool:
    return (root / "profiles").is_dir() and (root / "configs").is_dir()


def asset_root() -> Path:
    """The directory holding `profiles/` and `configs/`: the source tree when `spo` is imported from a
    checkout (recognised by its pyproject.toml beside the assets), else $SPO_ASSET_ROOT (an installed
    copy). Warns, naming the variable, when neither holds them; the profile loader then names the
    missing file."""
    if (SOURCE_ROOT / "pyproject.toml").is_file() and _holds_assets(SOURCE_ROOT):
        return SOURCE_ROOT
    configured = os.environ.get(ASSET_ROOT_ENV)
    if configured and _holds_assets(Path(configured)):
        return Path(configured)
    where = f"{ASSET_ROOT_ENV}={configured}" if configured else f"{SOURCE_ROOT} (and {ASSET_ROOT_ENV} is unset)"
    warnings.warn(f"spo: no profiles/ and configs/ in {where}: a non-editable install needs {ASSET_ROOT_ENV} "
                  "set to a directory holding them (docker/install.sh copies them there)", RuntimeWarning,
                  stacklevel=2)
    return Path(configured) if configured else SOURCE_ROOT
