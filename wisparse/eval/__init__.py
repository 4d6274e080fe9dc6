"""Measurements: perplexity, realised sparsity, result cache, report tables."""
