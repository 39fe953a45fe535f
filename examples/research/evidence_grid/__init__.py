"""The evidence grid (`examples/experiments.py`) and its section of a model card."""
