"""Thin command-line entry points (Hydra mains and argparse tools): exit codes and one-line errors."""
