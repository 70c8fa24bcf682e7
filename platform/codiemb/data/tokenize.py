"""The tokenizer of a model name or folder (the shard build, ``data/build.py``, tokenizes with it)."""

from __future__ import annotations


def load_tokenizer(model_name_or_path: str):
    """The model folder's tokenizer (aliases like ``minilm`` resolve locally; no remote code)."""
    from transformers import AutoTokenizer

    from codiemb.paths import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model_name_or_path), trust_remote_code=False)
