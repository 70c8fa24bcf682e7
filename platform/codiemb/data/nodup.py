"""No duplicate texts within a retrieval batch (sentence-transformers' ``NO_DUPLICATES`` batch
sampler, done with 64-bit hashes on a fixed arrangement so it stays random access).

Two rows in one global batch that share a text (the same positive, one row's positive being the
other's negative, the same query with another positive) turn a positive into an in-batch false
negative. Given an epoch's batches (``perm`` cut into ``nb`` global batches of ``g`` rows) and
each row's text hashes (query, positives, negatives: ``values[offsets[r]:offsets[r+1]]``):

1. **find** (vectorised): every (batch, hash) pair held by more than one row; every row but the
   first such row is an *offender* (a row repeating its own text is not);
2. **swap** each offender that still conflicts with a partner row: first from the rows the epoch
   leaves out (``drop_last``), then from the following batches in order (cyclic), taking the first
   partner that conflicts with nothing in the offender's batch and whose batch the offender does
   not conflict with; at most ``max_tries`` partners are tried, else the duplicate stays (counted).

Batches keep their size, so steps per task are unchanged; the result is a pure function of the
inputs (no RNG), so the rows of a step stay a function of (seed, step). An epoch without
duplicates keeps exactly its batches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np


@dataclass
class SwapStats:
    batches: int = 0  # batches in the epoch
    conflicted: int = 0  # batches that held a duplicate before the swaps
    swapped: int = 0  # batches that needed (and got) at least one swap
    unresolved: int = 0  # batches still holding a duplicate (no partner found)
    swaps: int = 0  # rows swapped


def _ragged(offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(text indices of ``rows`` in order, texts per row)."""
    starts = offsets[rows]
    counts = offsets[rows + 1] - starts
    total = int(counts.sum())
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + (np.arange(total, dtype=np.int64) - first), counts


def find_offenders(batches: np.ndarray, offsets: np.ndarray, values: np.ndarray,
                   rows_per_chunk: int = 1 << 18) -> np.ndarray:
    """Flat positions (batch · g + slot) of rows repeating a text of an earlier row of their batch.

    Works on ``rows_per_chunk`` rows of whole batches at a time, so its scratch memory is bounded."""
    nb, g = batches.shape
    step = max(1, rows_per_chunk // g)
    found = []
    for b0 in range(0, nb, step):
        part = batches[b0:b0 + step].reshape(-1)
        idx, counts = _ragged(offsets, part)
        h = values[idx]
        pos = np.repeat(np.arange(b0 * g, b0 * g + part.size, dtype=np.int64), counts)
        bid = pos // g
        order = np.lexsort((pos, h, bid))
        h, pos, bid = h[order], pos[order], bid[order]
        same = (bid[1:] == bid[:-1]) & (h[1:] == h[:-1]) & (pos[1:] != pos[:-1])
        found.append(pos[1:][same])
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def remove_duplicates(batches: np.ndarray, offsets: np.ndarray, values: np.ndarray,
                      spare: np.ndarray | None = None, max_tries: int = 1024) -> SwapStats:
    """Swap rows of ``batches`` (nb × g row ids, changed in place; ``spare`` too) until no batch
    holds a text twice, where a partner can be found. Returns the counts."""
    nb, g = batches.shape
    stats = SwapStats(batches=nb)
    offenders = find_offenders(batches, offsets, values)
    if offenders.size == 0:
        return stats
    spare = np.zeros(0, np.int64) if spare is None else spare
    flat = batches.reshape(-1)

    def hs(row: int) -> np.ndarray:
        return values[offsets[row]:offsets[row + 1]]

    counters: dict[int, Counter] = {}  # hash -> rows holding it, per batch touched (kept up to date)

    def counter(j: int) -> Counter:
        c = counters.get(j)
        if c is None:
            c = counters[j] = Counter()
            for p in range(j * g, (j + 1) * g):
                c.update(set(hs(int(flat[p])).tolist()))
        return c

    def clashes(c: Counter, row: set, leaving: set) -> bool:
        """Would ``row`` repeat a text of the batch counted by ``c`` once ``leaving`` has left it?"""
        return any(c[h] - (h in leaving) > 0 for h in row)

    def move(c: Counter, out: set, into: set) -> None:
        c.subtract(out)
        c.update(into)

    conflicted = set((offenders // g).tolist())
    stats.conflicted = len(conflicted)
    swapped: set[int] = set()
    unresolved: set[int] = set()
    for p in offenders.tolist():
        j = p // g
        here = counter(j)
        mine = set(hs(int(flat[p])).tolist())
        if not clashes(here, mine, mine):
            continue  # an earlier swap already removed its counterpart
        found = False
        tries = 0
        for s in range(spare.size):  # rows this epoch leaves out
            if tries >= max_tries:
                break
            tries += 1
            cand = set(hs(int(spare[s])).tolist())
            if not clashes(here, cand, mine):
                flat[p], spare[s] = spare[s], flat[p]
                move(here, mine, cand)
                found = True
                break
        jj = (j + 1) % nb
        while not found and tries < max_tries and jj != j:
            there = counter(jj)
            for q in range(jj * g, (jj + 1) * g):
                if tries >= max_tries:
                    break
                tries += 1
                cand = set(hs(int(flat[q])).tolist())
                if clashes(here, cand, mine) or clashes(there, mine, cand):
                    continue
                flat[p], flat[q] = flat[q], flat[p]
                move(here, mine, cand)
                move(there, cand, mine)
                found = True
                break
            jj = (jj + 1) % nb
        if found:
            stats.swaps += 1
            swapped.add(j)
        else:
            unresolved.add(j)
    stats.swapped = len(swapped)
    stats.unresolved = len(unresolved)
    return stats
