"""Probe families: pure functions from captured tensors to numbers, one module per family."""
