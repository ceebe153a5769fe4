"""Input data: tokenizer and pipelines."""
