"""Token shards: validated, tokenized training rows on storage, read by index (DESIGN §2).

A **shard set** is one dataset tokenized for one tokenizer and one set of max lengths. It is
built once (by Ray Data on a cluster, :mod:`codiemb.data.build`; or serially without Ray) and
reused by every run, restarted worker and Tune trial whose key matches. Layout::

    <root>/<key>/manifest.json                 written last (atomically): the set exists once it is there
    <root>/<key>/quarantine.jsonl              the bad rows the building pass found
    <root>/<key>/parts/<shard>/<array>.npy     one folder per shard (one raw block of one file)

Each shard holds numpy arrays, memory-mapped on read (MosaicML Streaming's shards / nanoGPT's
memmap): every text's token ids live in ONE flat ``tokens`` int32 array, ``text_offsets`` (int64,
texts + 1) cut it into texts, ``row_texts`` (int64, rows + 1) groups texts into rows:

- every text: ``pool_start`` (int32, one per text) its first pooled position (positions before it
  hold the instruction prefix and are left out of pooling, as ``Encoder.tokenize(instruction=...)``
  does; 0 without instruction);
- retrieval row: ``[query, positive_1..positive_p, negative_1..negative_k]``; ``n_pos`` (int32) is p;
- sts row: ``[sentence1, sentence2]`` and ``score`` (float64);
- unsupervised row: ``[text]``: ONE text (a source row with several text fields becomes that many
  rows, all with its file and line), so the sampler's rows are texts;
- retrieval: ``text_hash`` (int64, one per text, aligned with ``text_offsets``): a 64-bit hash of
  the text's token ids (:func:`codiemb.data.hashing.ids_hashes`), computed in the build pass, so the
  no-duplicates batch sampler compares texts without reading them (:meth:`ShardStore.row_hashes`);
- both: ``file`` (int32 index into the manifest's ``files``) and ``line`` (int64): where the row
  came from.

Shards are ordered by (file, first line); a row's **row id** is its position in that order, the
same on every node, so ``store.row(i)`` is the same row in every process and after any restart.
A worker's resident memory is the pages it touches, not the corpus: nothing here loads a whole
shard set. ``s3://`` roots are read through a local cache (each shard downloaded once, then
memory-mapped). Plain numpy + pyarrow: no Ray, no torch.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.fs as pafs

from codiemb.errors import DataError

log = logging.getLogger(__name__)

#: Bumped whenever the arrays or their meaning change, so old shard sets are never misread.
SHARD_FORMAT = 3  # 2: retrieval shards carry text_hash; 3: and pool_start per TEXT (passage and STS instructions)
MANIFEST = "manifest.json"
QUARANTINE = "quarantine.jsonl"
ARRAYS = {
    "retrieval": {"tokens": np.int32, "text_offsets": np.int64, "row_texts": np.int64, "n_pos": np.int32,
                  "pool_start": np.int32, "file": np.int32, "line": np.int64, "text_hash": np.int64},
    "sts": {"tokens": np.int32, "text_offsets": np.int64, "row_texts": np.int64, "score": np.float64,
            "pool_start": np.int32, "file": np.int32, "line": np.int64},
    "unsupervised": {"tokens": np.int32, "text_offsets": np.int64, "row_texts": np.int64,
                     "pool_start": np.int32, "file": np.int32, "line": np.int64},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "added_tokens.json")


# --------------------------------------------------------------------------- encoding rows
def _encode_texts(tokenizer, texts: list[str], max_length: int) -> list[list[int]]:
    if not texts:
        return []
    return [list(x) for x in tokenizer(texts, truncation=True, max_length=max_length, padding=False)["input_ids"]]


def _encode_with_instructions(tokenizer, texts: list[str], instructions: list[str | None], max_length: int
                              ) -> tuple[list[list[int]], list[int], list[int]]:
    """Ids and pool starts, exactly as ``Encoder.tokenize(texts, instruction=...)`` builds them:
    ``instruction + text`` tokenized with right truncation; every position up to the instruction's
    last token (leading special tokens included) is left out of pooling. Returns the indices of
    texts the instruction leaves no room for (bad rows)."""
    plain = [i for i, ins in enumerate(instructions) if not ins]
    ids: list[list[int] | None] = [None] * len(texts)
    starts = [0] * len(texts)
    for i, x in zip(plain, _encode_texts(tokenizer, [texts[i] for i in plain], max_length)):
        ids[i] = x
    withi = [i for i, ins in enumerate(instructions) if ins]
    no_room: list[int] = []
    if withi:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("instruction prefixes need a fast tokenizer (offset mapping)")
        side = tokenizer.truncation_side
        tokenizer.truncation_side = "right"
        try:
            enc = tokenizer([instructions[i] + texts[i] for i in withi], truncation=True, max_length=max_length,
                            padding=False, return_offsets_mapping=True, return_special_tokens_mask=True)
        finally:
            tokenizer.truncation_side = side
        for k, i in enumerate(withi):
            n_ins = len(instructions[i])
            special = enc["special_tokens_mask"][k]
            offs = enc["offset_mapping"][k]
            content = [s == 0 for s in special]
            last_inst, has_text = -1, False
            for pos, ((_, end), c) in enumerate(zip(offs, content)):
                if not c:
                    continue
                if end <= n_ins:  # a token holding text after the instruction is text (Encoder.tokenize)
                    last_inst = pos
                else:
                    has_text = True
            if texts[i].strip() and not has_text:
                no_room.append(i)
            ids[i] = list(enc["input_ids"][k])
            starts[i] = last_inst + 1
    return [x or [] for x in ids], starts, no_room


def instruction_defaults(instruction: str | dict | None) -> dict[str, str | None]:
    """A dataset's instruction prefixes by kind (``query``, ``passage``, ``sts``).

    A string is the legacy form: the query's (and, for STS, both sentences') instruction."""
    if isinstance(instruction, dict):
        return {k: instruction.get(k) or None for k in ("query", "passage", "sts")}
    return {"query": instruction or None, "passage": None, "sts": instruction or None}


@dataclass
class Encoded:
    """The arrays of one batch of valid rows (see the module docstring), before they are written."""

    arrays: dict[str, np.ndarray]
    rows: int
    rejected: list[tuple[int, str]]  # (position in the input, reason): rows the tokenizer could not serve


def encode_rows(tokenizer, task: str, records: Sequence[dict], max_length: dict[str, int],
                files: Sequence[int] | None = None, lines: Sequence[int] | None = None,
                instruction: str | dict | None = None) -> Encoded:
    """Tokenize validated ``records`` into one shard's arrays.

    ``max_length`` holds ``query``, ``passage`` (retrieval) or ``sts``. ``instruction`` holds the
    dataset's prefixes (:func:`instruction_defaults`); a row's own ``instruction`` (its query, or
    both STS sentences) and ``passage_instruction`` (its passages) win over them.
    """
    n = len(records)
    files = list(files) if files is not None else [0] * n
    lines = list(lines) if lines is not None else list(range(1, n + 1))
    defaults = instruction_defaults(instruction)
    rejected: list[tuple[int, str]] = []
    bad: set[int] = set()
    if task == "retrieval":
        q_ids, q_start, no_room = _encode_with_instructions(
            tokenizer, [r["query"] for r in records],
            [r.get("instruction") or defaults["query"] for r in records], int(max_length["query"]))
        for i in no_room:
            rejected.append((i, f"instruction leaves no room for the query within max_length.query={max_length['query']}"))
        bad.update(no_room)
        owner = [i for i, r in enumerate(records) for _ in list(r["positives"]) + list(r.get("negatives") or [])]
        flat = [t for r in records for t in list(r["positives"]) + list(r.get("negatives") or [])]
        p_ids, p_start, p_no_room = _encode_with_instructions(
            tokenizer, flat, [records[i].get("passage_instruction") or defaults["passage"] for i in owner],
            int(max_length["passage"]))
        for i in sorted({owner[j] for j in p_no_room} - bad):
            rejected.append((i, f"passage instruction leaves no room for a passage within "
                                f"max_length.passage={max_length['passage']}"))
            bad.add(i)
        texts: list[list[int]] = []
        starts: list[int] = []
        row_texts, n_pos, keep = [0], [], []
        k = 0
        for i, r in enumerate(records):
            count = len(r["positives"]) + len(r.get("negatives") or [])
            if i not in bad:
                texts.append(q_ids[i])
                texts += p_ids[k: k + count]
                starts.append(q_start[i])
                starts += p_start[k: k + count]
                row_texts.append(len(texts))
                n_pos.append(len(r["positives"]))
                keep.append(i)
            k += count
        from codiemb.data.hashing import ids_hashes

        extra = {"n_pos": np.asarray(n_pos, np.int32), "text_hash": ids_hashes(texts)}
    elif task == "sts":
        limit = int(max_length["sts"])
        ins = [r.get("instruction") or defaults["sts"] for r in records]
        a, a_start, a_bad = _encode_with_instructions(tokenizer, [r["sentence1"] for r in records], ins, limit)
        b, b_start, b_bad = _encode_with_instructions(tokenizer, [r["sentence2"] for r in records], ins, limit)
        for i in sorted(set(a_bad) | set(b_bad)):
            rejected.append((i, f"instruction leaves no room for the sentence within max_length.sts={limit}"))
            bad.add(i)
        keep = [i for i in range(n) if i not in bad]
        texts = [t for i in keep for t in (a[i], b[i])]
        starts = [s for i in keep for s in (a_start[i], b_start[i])]
        row_texts = list(range(0, 2 * len(keep) + 1, 2))
        extra = {"score": np.asarray([float(records[i]["score"]) for i in keep], np.float64)}
    elif task == "unsupervised":  # one shard row per text, so file/line repeat for multi-field rows
        limit = int(max_length["sts"])
        owner = [i for i, r in enumerate(records) for _ in r["texts"]]
        flat = [t for r in records for t in r["texts"]]
        ids, st, no_room = _encode_with_instructions(
            tokenizer, flat, [records[i].get("instruction") or defaults["sts"] for i in owner], limit)
        for i in sorted({owner[j] for j in no_room}):
            rejected.append((i, f"instruction leaves no room for the text within max_length.sts={limit}"))
            bad.add(i)
        kept = [j for j, i in enumerate(owner) if i not in bad]
        texts = [ids[j] for j in kept]
        starts = [st[j] for j in kept]
        row_texts = list(range(len(kept) + 1))
        keep = [owner[j] for j in kept]  # one entry per output row: its source record
        extra = {}
    else:
        raise ValueError(f"unknown task {task!r}")
    lengths = np.fromiter((len(t) for t in texts), dtype=np.int64, count=len(texts))
    offsets = np.zeros(len(texts) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens = np.fromiter((x for t in texts for x in t), dtype=np.int32, count=int(offsets[-1]))
    arrays = {"tokens": tokens, "text_offsets": offsets, "row_texts": np.asarray(row_texts, np.int64),
              "pool_start": np.asarray(starts, np.int32),
              "file": np.asarray([files[i] for i in keep], np.int32),
              "line": np.asarray([lines[i] for i in keep], np.int64), **extra}
    return Encoded(arrays, len(keep), rejected)


def shard_stats(task: str, arrays: dict[str, np.ndarray]) -> dict[str, int]:
    """Per-shard numbers the manifest sums up (``max_negatives`` etc. are dataset-wide facts that
    every rank reads from the manifest, so all ranks agree on tensor shapes)."""
    rows = int(len(arrays["row_texts"]) - 1)
    out = {"rows": rows, "tokens": int(arrays["tokens"].size)}
    if task == "retrieval" and rows:
        per_row = np.diff(arrays["row_texts"]) - 1
        neg = per_row - arrays["n_pos"]
        out.update(min_positives=int(arrays["n_pos"].min()), max_positives=int(arrays["n_pos"].max()),
                   min_negatives=int(neg.min()), max_negatives=int(neg.max()),
                   with_instruction=int((arrays["pool_start"] > 0).sum()))
    elif task in ("sts", "unsupervised") and rows:
        out["with_instruction"] = int((arrays["pool_start"] > 0).sum())
    if task == "unsupervised":  # the source rows its texts came from (a row's texts are adjacent)
        f, ln = np.asarray(arrays["file"]), np.asarray(arrays["line"])
        out["source_rows"] = int(rows and 1 + ((f[1:] != f[:-1]) | (ln[1:] != ln[:-1])).sum())
    return out


def merge_stats(task: str, parts: Iterable[dict]) -> dict[str, int]:
    total: dict[str, int] = {"rows": 0, "tokens": 0}
    for s in parts:
        total["rows"] += s["rows"]
        total["tokens"] += s["tokens"]
        if task == "retrieval" and s["rows"]:
            for k, f in (("min_positives", min), ("max_positives", max), ("min_negatives", min),
                         ("max_negatives", max)):
                total[k] = f(total[k], s[k]) if k in total else s[k]
            total["with_instruction"] = total.get("with_instruction", 0) + s["with_instruction"]
        elif s.get("with_instruction"):
            total["with_instruction"] = total.get("with_instruction", 0) + s["with_instruction"]
        if task == "unsupervised":
            total["source_rows"] = total.get("source_rows", 0) + s.get("source_rows", 0)
    return total


# --------------------------------------------------------------------------- storage
def open_root(uri: str) -> tuple[pafs.FileSystem, str]:
    from codiemb.data.local import open_filesystem

    return open_filesystem(uri)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write ``data`` to ``path``; local files go through a temp file and a rename (atomic);
    an S3 PUT is atomic by itself."""
    if fs.type_name == "local":
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as fh:
        fh.write(data)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def write_shard(fs: pafs.FileSystem, set_dir: str, name: str, arrays: dict[str, np.ndarray]) -> None:
    for key, arr in arrays.items():
        write_bytes(fs, join(set_dir, "parts", name, f"{key}.npy"), npy_bytes(arr))


def shard_name(file_index: int, first_line: int) -> str:
    return f"f{file_index:05d}-l{first_line:012d}"


# --------------------------------------------------------------------------- the key
def tokenizer_fingerprint(model_name_or_path: str) -> str:
    """sha256 over the model folder's tokenizer files (so a fine-tuned copy of a model, which keeps
    its tokenizer, shares shards with its base); the name itself when it is not a local folder."""
    from codiemb.paths import resolve_model

    folder = Path(resolve_model(model_name_or_path))
    h = hashlib.sha256()
    found = False
    if folder.is_dir():
        for name in TOKENIZER_FILES:
            p = folder / name
            if p.is_file():
                found = True
                h.update(name.encode())
                with open(p, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
    if not found:
        h.update(str(model_name_or_path).encode())
    return h.hexdigest()[:16]


def file_identity(fs: pafs.FileSystem, files: Sequence[str]) -> list[list]:
    """(path, size, mtime) of every input file: the data part of a shard set's key."""
    out = []
    for f, info in zip(files, fs.get_file_info(list(files))):
        mtime = info.mtime_ns if info.mtime_ns is not None else (
            int(info.mtime.timestamp() * 1e9) if info.mtime is not None else 0)
        out.append([f, int(info.size or 0), int(mtime)])
    return out


def shard_key(spec: dict[str, Any]) -> str:
    blob = json.dumps({"format": SHARD_FORMAT, **spec}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


# --------------------------------------------------------------------------- reading
def _cache_root() -> Path:
    return Path(os.environ.get("CODIEMB_CACHE") or Path(tempfile.gettempdir()) / "codiemb-cache") / "shards"


class ShardStore:
    """Random access to the rows of one shard set (memory-mapped), or of arrays held in memory.

    ``row ids`` are 0..num_rows-1 in the set's fixed order. Only the shards a process touches are
    opened (at most ``max_open`` at a time).
    """

    def __init__(self, task: str, shards: list[dict], stats: dict, *, root: str | None = None,
                 files: list | None = None, pad_id: int = 0, key: str | None = None,
                 arrays: list[dict[str, np.ndarray]] | None = None, max_open: int = 32):
        self.task = task
        self.root = root
        self.key = key
        self.stats = dict(stats)
        self.files = list(files or [])
        self.pad_id = int(pad_id)
        self.shards = shards
        counts = np.asarray([s["rows"] for s in shards], np.int64)
        self._starts = np.zeros(len(shards) + 1, np.int64)
        np.cumsum(counts, out=self._starts[1:])
        self._arrays = arrays  # in-memory store
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self._max_open = max_open
        self._fs = None

    # ---- constructors
    @classmethod
    def open(cls, set_dir: str) -> "ShardStore":
        fs, root = open_root(set_dir)
        try:
            with fs.open_input_stream(join(root, MANIFEST)) as fh:
                manifest = json.loads(fh.readall())
        except (OSError, FileNotFoundError) as exc:
            raise DataError(f"{set_dir}: no shard set here ({exc})") from None
        if manifest.get("format") != SHARD_FORMAT:
            raise DataError(f"{set_dir}: shard format {manifest.get('format')} is not {SHARD_FORMAT}; rebuild it")
        store = cls(manifest["task"], manifest["shards"], manifest["stats"], root=set_dir,
                    files=manifest.get("files"), pad_id=manifest.get("pad_id", 0), key=manifest.get("key"))
        store.manifest = manifest
        return store

    @classmethod
    def from_records(cls, tokenizer, task: str, records: Sequence[dict], max_length: dict[str, int],
                     instruction: str | None = None) -> "ShardStore":
        """An in-memory store of ``records`` (small sets: tests, probes, benchmarks)."""
        enc = encode_rows(tokenizer, task, records, max_length, instruction=instruction)
        if enc.rejected:
            i, why = enc.rejected[0]
            raise DataError(f"row {i + 1}: {why}")
        stats = shard_stats(task, enc.arrays)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        return cls(task, [stats], merge_stats(task, [stats]), pad_id=pad, arrays=[enc.arrays])

    # ---- access
    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_rows(self) -> int:
        return len(self)

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if self._arrays is not None:
            return self._arrays[s]
        hit = self._open.get(s)
        if hit is not None:
            self._open.move_to_end(s)
            return hit
        folder = self._local_folder(self.shards[s]["name"])
        arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r", allow_pickle=False) for k in ARRAYS[self.task]}
        self._open[s] = arrays
        if len(self._open) > self._max_open:
            self._open.popitem(last=False)
        return arrays

    def _local_folder(self, name: str) -> Path:
        fs, root = open_root(self.root)
        if fs.type_name == "local":
            return Path(root) / "parts" / name
        local = _cache_root() / (self.key or hashlib.sha256(self.root.encode()).hexdigest()[:20]) / name
        if not (local / ".complete").is_file():  # download once per node
            tmp = local.parent / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True, exist_ok=True)
            for k in ARRAYS[self.task]:
                with fs.open_input_stream(join(root, "parts", name, f"{k}.npy")) as src, open(tmp / f"{k}.npy", "wb") as dst:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
            (tmp / ".complete").write_text("ok\n")
            try:
                os.replace(tmp, local)
            except OSError:  # another process on this node got there first
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
        return local

    def _locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} outside the shard set of {len(self)} rows")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        return self._shard(s), int(i - self._starts[s])

    def texts(self, i: int) -> list[np.ndarray]:
        """Row i's token id arrays (int32 views): see the module docstring for their order."""
        a, j = self._locate(i)
        lo, hi = int(a["row_texts"][j]), int(a["row_texts"][j + 1])
        off = a["text_offsets"][lo: hi + 1]
        tok = a["tokens"]
        return [tok[int(off[t]): int(off[t + 1])] for t in range(hi - lo)]

    def pool_starts(self, i: int) -> list[int]:
        """Row i's first pooled position of every text (``texts(i)``'s order; > 0 after an instruction)."""
        a, j = self._locate(i)
        return [int(x) for x in a["pool_start"][int(a["row_texts"][j]): int(a["row_texts"][j + 1])]]

    def retrieval_row(self, i: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray], int]:
        """(query ids, positives' ids, negatives' ids, the query's pool start) of retrieval row i
        (the passages' pool starts: :meth:`pool_starts`)."""
        a, j = self._locate(i)
        texts = self.texts(i)
        p = int(a["n_pos"][j])
        return texts[0], texts[1: 1 + p], texts[1 + p:], int(a["pool_start"][int(a["row_texts"][j])])

    def text_row(self, i: int) -> tuple[np.ndarray, int]:
        """(token ids, pool start) of unsupervised row i (one text)."""
        a, j = self._locate(i)
        lo = int(a["row_texts"][j])
        off = a["text_offsets"]
        return a["tokens"][int(off[lo]): int(off[lo + 1])], int(a["pool_start"][lo])

    def sts_row(self, i: int) -> tuple[np.ndarray, np.ndarray, float]:
        a, j = self._locate(i)
        s1, s2 = self.texts(i)
        return s1, s2, float(a["score"][j])

    def row_hashes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets, values)`` over the whole set: row i's text hashes (query, positives,
        negatives) are ``values[offsets[i]:offsets[i + 1]]``. Reads only the small ``text_hash`` and
        ``row_texts`` arrays (8 bytes a text), never the tokens."""
        if self.task != "retrieval":
            raise ValueError("row hashes exist for retrieval shard sets only")
        offs, vals, base = [np.zeros(1, np.int64)], [], 0
        remote = self._arrays is None and open_root(self.root)[0].type_name != "local"
        for s in range(len(self.shards)):
            if remote:  # just the two small arrays, not the whole shard into the local cache
                fs, root = open_root(self.root)
                a = {}
                for k in ("row_texts", "text_hash"):
                    with fs.open_input_stream(join(root, "parts", self.shards[s]["name"], f"{k}.npy")) as fh:
                        a[k] = np.load(io.BytesIO(fh.readall()), allow_pickle=False)
            else:
                a = self._shard(s)
            rt = np.asarray(a["row_texts"], np.int64)
            offs.append(rt[1:] + base)
            vals.append(np.asarray(a["text_hash"], np.int64))
            base += int(rt[-1])
        return np.concatenate(offs), (np.concatenate(vals) if vals else np.zeros(0, np.int64))

    def source(self, i: int) -> tuple[str, int]:
        """(file, line) row i was read from."""
        a, j = self._locate(i)
        f = int(a["file"][j])
        name = self.files[f][0] if self.files and f < len(self.files) else str(f)
        return name, int(a["line"][j])

    def describe(self) -> str:
        return f"{self.task} shard set {self.key or '(memory)'}: {len(self)} rows, {self.stats.get('tokens', 0)} tokens"
