"""Evaluation of pruned models on the paper's benchmarks: ``metrics`` holds the scoring functions (pure, no model)."""
