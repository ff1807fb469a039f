"""Where the shipped Hydra configs live: one place for every CLI and the HF run import to find them.

The YAML files sit at the repository root (configs/); a wheel or `pip install .` ships them inside the package as
attnres_train/_configs (pyproject.toml), so an installed package trains without the checkout. The installed copy
is preferred; a source checkout or editable install falls back to the root configs/ (docs/training.md "Install").
"""

from pathlib import Path

PACKAGED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "_configs"  # in a wheel / non-editable install
CHECKOUT_CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # in a source checkout

CONFIG_DIR = PACKAGED_CONFIG_DIR if (PACKAGED_CONFIG_DIR / "config.yaml").is_file() else CHECKOUT_CONFIG_DIR
MODEL_PRESET_DIR = CONFIG_DIR / "model"
