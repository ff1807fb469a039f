"""The argument parser of every ``attnres-*`` tool.

Why: a usage error must read like every other user error — one ``error: ...`` line and exit status 2 — not
argparse's usage block; one class so the tools cannot drift apart (docs/training.md, "Bad input").
"""

from __future__ import annotations

import argparse


class ErrorLineParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one ``error: ...`` line (exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
