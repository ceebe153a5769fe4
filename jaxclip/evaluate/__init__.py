"""Evaluation: zero-shot classification, image-text retrieval and linear probes, run
by the evaluators of `config.evals` during training or by `python -m jaxclip.evaluate`
(evaluators.py)."""
