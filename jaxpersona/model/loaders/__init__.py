"""Checkpoint loaders: HF model directories and GGUF files."""
