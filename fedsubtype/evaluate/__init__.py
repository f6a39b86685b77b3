"""Evaluation: predictions of a model on a dataset, metrics with confidence intervals, thresholds, radiomics baselines."""
