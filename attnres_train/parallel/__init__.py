"""Parallelisms applied to the plain model from outside (EP, TP, FSDP, PP)."""
