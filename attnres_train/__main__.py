"""``python -m attnres_train`` == ``attnres-train`` (the Hydra training entry point)."""

from .cli.train import main

main()
