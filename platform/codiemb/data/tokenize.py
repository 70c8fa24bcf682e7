"""The tokenizer of a model name or folder (the shard build, ``data/build.py``, tokenizes with it)."""

from __future__ import annotations


def load_tokenizer(model_name_or_path: str, pooling: str | None = None, append_eos: bool | None = None):
    """The model folder's tokenizer (aliases like ``minilm`` resolve locally; no remote code),
    prepared as ``Encoder.load`` prepares it (``model.decoder.prepare_tokenizer``: a pad token,
    EOS appended for last-token pooling, right padding), so the shards hold the ids the encoder
    would make. ``pooling`` None: the folder's own."""
    from pathlib import Path

    from transformers import AutoTokenizer

    from codiemb.model.decoder import prepare_tokenizer
    from codiemb.paths import resolve_model

    folder = resolve_model(model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if pooling is None:
        from codiemb.model.encoder import Encoder

        pooling = Encoder._read_st_layout(Path(folder))["pooling"] if Path(folder).is_dir() else "mean"
    return prepare_tokenizer(tokenizer, pooling=pooling, append_eos=append_eos)
