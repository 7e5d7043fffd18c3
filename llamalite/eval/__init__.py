"""Evaluation: validation loss and zero-shot benchmarks scored as lm-evaluation-harness scores them."""
