"""Corpus embeddings cached on disk, so an unchanged model never embeds an unchanged corpus twice.

Embedding a retrieval corpus is what an evaluation spends its time on (SciFact: 5,183 documents at
256 tokens). The pipeline scores one model on the dev qrels (the gate) and then on the test qrels
(the report), and the gate scores the champion again on every later run: the same corpus, the same
model, the same vectors. :class:`EmbeddingCache` stores them once, under a key made of everything
that decides them:

- the model: sha256 over its weights (every tensor of the state dict: name, dtype, shape, bytes),
  its pooling and normalisation, and its tokenizer (the fast tokenizer's full JSON, else its class
  and vocabulary) — a retrained, merged or re-saved model with other weights is another key;
- the corpus file: resolved path, size and mtime (as the token shards key their inputs);
- the document max length and the instruction.

A cache entry is a folder ``<root>/<key>/`` with ``embeddings.f32`` (N x D float32, row-major),
``ids.jsonl`` (one JSON string per line) and ``meta.json`` (the key's parts, N, D); it is written to
a temporary folder and renamed when complete, so a crash never leaves a half entry that reads as
valid. Reading streams it back in chunks through a memory map (the scale rule: no whole corpus as
Python objects). The vectors are the float32 numbers the encoder produced, so a hit gives exactly
the scores a fresh embedding gives.

Imports numpy and torch only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
META = "meta.json"
VECTORS = "embeddings.f32"
IDS = "ids.jsonl"


def tokenizer_identity(tokenizer) -> str:
    """sha256 of what makes the tokenizer tokenize as it does (not where it was loaded from)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("truncation", None)  # call-time settings the last call left behind, not the tokenizer
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(getattr(tokenizer, "special_tokens_map", {}), sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_fingerprint(encoder) -> str:
    """sha256 over the encoder's weights, pooling, normalisation and tokenizer (see the module docstring)."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(f"pooling={encoder.pooling}|normalize={encoder.normalize}".encode())
    h.update(tokenizer_identity(encoder.tokenizer).encode())
    tp = getattr(encoder, "token_prepending", None)  # Token Prepending changes every embedding (off: key unchanged)
    if tp is not None:
        h.update(("token_prepending=" + json.dumps(dataclasses.asdict(tp), sort_keys=True)).encode())
    return h.hexdigest()[:24]


def corpus_identity(path: str | os.PathLike) -> list:
    p = Path(path).resolve()
    st = p.stat()
    return [str(p), int(st.st_size), int(st.st_mtime_ns)]


class EmbeddingCache:
    """Corpus embeddings on disk under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, encoder, corpus_path: str | os.PathLike, max_length: int | None,
            instruction: str | None = None, *, fingerprint: str | None = None) -> tuple[str, dict]:
        max_length = int(max_length or encoder.max_seq_length)  # None means the model's own limit
        parts = {"format": CACHE_FORMAT, "model": fingerprint or model_fingerprint(encoder),
                 "corpus": corpus_identity(corpus_path), "max_length": max_length, "instruction": instruction or None,
                 "normalized": True, "dtype": "float32"}
        blob = json.dumps(parts, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:24], parts

    def _dir(self, key: str) -> Path:
        return self.root / key

    def has(self, key: str) -> bool:
        return (self._dir(key) / META).is_file()

    def read(self, key: str, chunk_size: int = 16384) -> Iterator[tuple[list[str], np.ndarray]]:
        """The cached ``(ids, embeddings)`` in chunks of ``chunk_size`` rows, in corpus order."""
        folder = self._dir(key)
        meta = json.loads((folder / META).read_text())
        n, dim = int(meta["n"]), int(meta["dim"])
        vectors = np.memmap(folder / VECTORS, dtype=np.float32, mode="r", shape=(n, dim)) if n else None
        with open(folder / IDS, encoding="utf-8") as fh:
            start = 0
            while start < n:
                ids = [json.loads(next(fh)) for _ in range(min(chunk_size, n - start))]
                yield ids, np.array(vectors[start:start + len(ids)])
                start += len(ids)

    def write_through(self, key: str, parts: dict,
                      batches: Iterable[tuple[list[str], object]]) -> Iterator[tuple[list[str], object]]:
        """Pass ``batches`` on unchanged while writing them to a temporary entry; commit it at the end.

        An entry is committed only when the iteration finished (an error or an early stop leaves
        nothing behind), by renaming the temporary folder into place.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=self.root))
        n, dim = 0, None
        try:
            with open(tmp / VECTORS, "wb") as vec, open(tmp / IDS, "w", encoding="utf-8") as idf:
                for ids, emb in batches:
                    arr = emb.detach().float().cpu().numpy() if isinstance(emb, torch.Tensor) else emb
                    arr = np.ascontiguousarray(arr, dtype=np.float32)
                    dim = arr.shape[1] if dim is None else dim
                    vec.write(arr.tobytes())
                    idf.writelines(json.dumps(str(i)) + "\n" for i in ids)
                    n += len(ids)
                    yield ids, emb
            (tmp / META).write_text(json.dumps({**parts, "n": n, "dim": dim or 0}, indent=1))
            dest = self._dir(key)
            if dest.exists():  # another process finished the same entry first: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                os.replace(tmp, dest)
            logger.info("embedding cache: stored %d x %s vectors as %s", n, dim, dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def corpus_batches(self, encoder, corpus_path, max_length: int | None, make_batches, *,
                       instruction: str | None = None, chunk_size: int = 16384,
                       fingerprint: str | None = None) -> Iterator[tuple[list[str], object]]:
        """The corpus embeddings from the cache, or ``make_batches()`` written through to it."""
        key, parts = self.key(encoder, corpus_path, max_length, instruction, fingerprint=fingerprint)
        if self.has(key):
            self.hits += 1
            logger.info("embedding cache: hit %s (%s at %s tokens)", key, corpus_path, max_length)
            return self.read(key, chunk_size)
        self.misses += 1
        logger.info("embedding cache: miss %s (%s at %s tokens); embedding", key, corpus_path, max_length)
        return self.write_through(key, parts, make_batches())
