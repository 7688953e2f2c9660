"""Hugging Face configs of a few models, shipped for `python -m fewbit_dist.plan --model NAME` (package data)."""
