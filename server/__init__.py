"""Flower ServerApp of fedsubtype (strategy, per-round artefacts, checkpoints)."""
