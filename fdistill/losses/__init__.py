"""Losses: pure functions of tensors, the exact formulas of the papers (equation numbers in the docstrings).
Per-sample values in, hyper-parameters as plain floats."""
