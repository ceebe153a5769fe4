"""Packaged data files (BPE merges)."""
