"""Where the shipped Hydra configs live: one place for every CLI and the HF run import to find them.

They sit next to the package, so they are found in a source checkout (``pip install -e .``).
"""

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_PRESET_DIR = CONFIG_DIR / "model"
