"""Packaged data files (class names and prompt templates for zero-shot evaluation)."""
