"""Tokenize normalized records once, before training (DESIGN §2: "tokenize in map_batches").

:func:`tokenize_batch` is the pure function (no Ray): the plain-torch path calls it directly,
and :func:`tokenize_dataset` runs it in ONE ``map_batches`` step on an actor pool, so the
tokenizer loads once per actor, not once per batch.

Output columns, per text field ``F`` of the task (``query``, ``positives``, ``negatives`` for
retrieval; ``sentence1``, ``sentence2`` for sts): ``F_input_ids`` and ``F_attention_mask``,
unpadded (the collator pads per batch). A list field (``positives``, ``negatives``) gives a
list of id lists per row. ``score`` is kept for sts. A retrieval row's ``instruction``, when
set, is prepended to its query (``"{instruction} {query}"``) before tokenizing.

Length limits come from ``max_length`` (``model.max_length`` in the config): ``query`` for
queries, ``passage`` for positives and negatives, ``sts`` for both sts sentences.
"""

from __future__ import annotations

from typing import Any

from codiemb.data.schemas import TEXT_FIELDS
from codiemb.errors import ConfigError

#: Which ``max_length`` key limits each text field.
LENGTH_KEY = {"query": "query", "positives": "passage", "negatives": "passage",
              "sentence1": "sts", "sentence2": "sts"}
LIST_FIELDS = ("positives", "negatives")


def _limit(max_length: Any, name: str) -> int:
    key = LENGTH_KEY[name]
    value = max_length.get(key) if isinstance(max_length, dict) else getattr(max_length, key, None)
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"max_length.{key} must be a positive integer, got {value!r}")
    return value


def _encode(tokenizer, texts: list[str], max_length: int) -> tuple[list[list[int]], list[list[int]]]:
    if not texts:
        return [], []
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding=False)
    return [list(x) for x in enc["input_ids"]], [list(x) for x in enc["attention_mask"]]


def tokenize_batch(tokenizer, batch: dict[str, list], task: str, max_length) -> dict[str, list]:
    """Tokenize a column-oriented batch ``{field: [value per row]}``; see the module docstring.

    ``max_length`` is a dict (or an object with attributes) holding ``query``, ``passage``
    and/or ``sts``. Returns ``{F_input_ids, F_attention_mask, ...}`` (+ ``score`` for sts).
    """
    if task not in TEXT_FIELDS:
        raise ValueError(f"unknown task {task!r}")
    out: dict[str, list] = {}
    for name in TEXT_FIELDS[task]:
        values = list(batch[name])
        limit = _limit(max_length, name)
        if name == "query" and "instruction" in batch:
            values = [f"{ins} {q}" if ins else q for ins, q in zip(batch["instruction"], values)]
        if name in LIST_FIELDS:
            lists = [list(v) if v is not None else [] for v in values]
            ids, mask = _encode(tokenizer, [t for texts in lists for t in texts], limit)
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = [], []
            start = 0
            for texts in lists:
                out[f"{name}_input_ids"].append(ids[start:start + len(texts)])
                out[f"{name}_attention_mask"].append(mask[start:start + len(texts)])
                start += len(texts)
        else:
            out[f"{name}_input_ids"], out[f"{name}_attention_mask"] = _encode(tokenizer, values, limit)
    if task == "sts":
        out["score"] = [float(s) for s in batch["score"]]
    return out


def load_tokenizer(model_name_or_path: str):
    """The model folder's tokenizer (aliases like ``minilm`` resolve locally; no remote code)."""
    from transformers import AutoTokenizer

    from codiemb.paths import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model_name_or_path), trust_remote_code=False)


class TokenizeBatches:
    """Ray Data callable class: loads the tokenizer once per actor, then tokenizes Arrow batches."""

    def __init__(self, model_name_or_path: str, task: str, max_length):
        self.tokenizer = load_tokenizer(model_name_or_path)
        self.task = task
        self.max_length = dict(max_length) if isinstance(max_length, dict) else max_length

    def __call__(self, batch):
        import pyarrow as pa

        out = tokenize_batch(self.tokenizer, batch.to_pydict(), self.task, self.max_length)
        ids = pa.list_(pa.int32())
        types = {k: (pa.list_(ids) if k.split("_")[0] in LIST_FIELDS else ids) for k in out if k != "score"}
        if "score" in out:
            types["score"] = pa.float64()
        return pa.table({k: pa.array(v, type=types[k]) for k, v in out.items()})


def tokenize_dataset(ds, model_name_or_path: str, task: str, max_length, *, concurrency: int = 1,
                     batch_size: int = 256, num_cpus: float = 1.0):
    """One ``map_batches`` step on a fixed actor pool of ``concurrency`` tokenizer actors."""
    import ray

    if task not in TEXT_FIELDS:
        raise ValueError(f"unknown task {task!r}")
    for name in TEXT_FIELDS[task]:
        _limit(max_length, name)  # fail here, not inside an actor
    return ds.map_batches(
        TokenizeBatches,
        fn_constructor_args=(str(model_name_or_path), task, dict(max_length) if isinstance(max_length, dict)
                             else {k: getattr(max_length, k) for k in ("query", "passage", "sts")}),
        batch_format="pyarrow",
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        udf_modifying_row_count=False,
    )
