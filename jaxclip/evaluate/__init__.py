"""Evaluation: zero-shot classification (retrieval and linear probes come later)."""
