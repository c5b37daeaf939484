"""Evaluation: matching particles to truth, metrics and plots, hand labels, choosing post-processing on valid."""
