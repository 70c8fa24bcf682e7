"""Task-batch sampler: every global batch is ONE task and ONE source dataset (DESIGN §4).

All ranks see the same dataset at the same step (so gathered in-batch negatives never mix
tasks), and each rank takes its own disjoint slice of that global batch. The schedule is a pure
function of (sizes, batch sizes, world size, policy, epochs, seed): ``batch(step, rank)`` is
random access, so resuming is "continue from step k" on every rank.

Definitions, for dataset k with n_k rows and per-rank batch b_k:

* global batch G_k = b_k · world_size; full global batches per epoch nb_k = ⌊n_k / G_k⌋
  (``drop_last=False``: ⌈n_k / G_k⌉, the last batch topped up from the start of the same
  epoch's permutation, so a few rows repeat within that epoch).
* epoch e of dataset k reads the rows in a permutation seeded by (seed, crc32(name), e); its
  j-th global batch is ``perm[j·G_k:(j+1)·G_k]`` and rank r gets ``[r·b_k:(r+1)·b_k]`` of it.
* a plan entry ``(name, c)`` is dataset k's c-th batch counted from its start: epoch c // nb_k,
  batch c % nb_k within that epoch (with ``epochs ≤ 1`` c is simply the step index into the
  dataset's epoch).

Policies (total steps T = Σ_k ⌊epochs · nb_k⌋, or ``max_steps`` when given):

* ``proportional``: dataset k gets exactly ⌊epochs · nb_k⌋ steps; the plan is built one epoch
  block at a time (each block holds every dataset's batches of that epoch, in a seeded shuffle),
  so every dataset progresses through its epochs at the same relative pace.
* ``round_robin``: datasets in the order of ``sizes``, one step each, cycling; a dataset that
  runs out of batches moves on to its next epoch (a fresh permutation) and keeps cycling.
* ``temperature``: each step draws dataset k with probability p_k ∝ nb_k^(1/T) from a seeded
  RNG (T = 1: proportional in expectation; T → ∞: uniform); exhausted datasets move to their
  next epoch. nb_k (batches, not rows) is the size so that per-task batch sizes stay honest.

**No duplicates** (``row_hashes``, the default for retrieval datasets in training): for a dataset
given its rows' text hashes, each epoch's global batches are rearranged once by
:func:`codiemb.data.nodup.remove_duplicates` so that no batch holds the same text in two rows
(rows swap places between batches or with the rows ``drop_last`` leaves out). Batch sizes and the
plan are unchanged (exact steps per task), and the arrangement is a pure function of (seed,
epoch), so the rows of a step stay random access. Batches that needed a swap are counted and logged.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections import Counter
from typing import Any

import numpy as np

from codiemb.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POLICIES = ("proportional", "round_robin", "temperature")


class TaskBatchSampler:
    """One task and one dataset per global step; disjoint per-rank slices; random access by step."""

    def __init__(
        self,
        sizes: dict[str, int],
        batch_sizes: dict[str, int],
        *,
        world_size: int = 1,
        policy: str = "proportional",
        temperature: float = 1.0,
        epochs: float = 1.0,
        seed: int = 0,
        drop_last: bool = True,
        max_steps: int | None = None,
        row_hashes: dict[str, Any] | None = None,
    ) -> None:
        """``row_hashes``: dataset name -> ``(offsets, values)`` (row r's text hashes are
        ``values[offsets[r]:offsets[r + 1]]``), or a function returning them (called once, on first
        use); those datasets get batches without duplicate texts."""
        if policy not in POLICIES:
            raise ConfigError(f"sampler.policy: unknown policy {policy!r}, expected one of {', '.join(POLICIES)}")
        if not sizes:
            raise ConfigError("sampler: no datasets to sample from")
        missing = [k for k in sizes if k not in batch_sizes]
        if missing:
            raise ConfigError(f"sampler: no batch size for dataset(s) {', '.join(missing)}")
        if world_size < 1:
            raise ConfigError(f"sampler: world_size must be >= 1, got {world_size}")
        if temperature <= 0:
            raise ConfigError(f"sampler.temperature must be > 0, got {temperature}")
        if epochs <= 0:
            raise ConfigError(f"train.epochs must be > 0, got {epochs}")
        if max_steps is not None and max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0, got {max_steps}")
        self.sizes = {k: int(v) for k, v in sizes.items()}
        self.batch_sizes = {k: int(batch_sizes[k]) for k in sizes}
        self.world_size = int(world_size)
        self.policy = policy
        self.temperature = float(temperature)
        self.epochs = float(epochs)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.max_steps = None if max_steps is None else int(max_steps)
        self.names = list(self.sizes)
        self._row_hashes = dict(row_hashes or {})
        unknown = [k for k in self._row_hashes if k not in self.sizes]
        if unknown:
            raise ConfigError(f"sampler: row hashes for unknown dataset(s) {', '.join(unknown)}")
        self.no_duplicates = sorted(self._row_hashes)
        self.swap_stats: dict[tuple[str, int], Any] = {}  # (dataset, epoch) -> nodup.SwapStats

        self.global_batch: dict[str, int] = {}
        self.batches_per_epoch: dict[str, int] = {}
        for k in self.names:
            b = self.batch_sizes[k]
            if b <= 0:
                raise ConfigError(f"data.datasets[{k}].batch_size must be > 0, got {b}")
            g = b * self.world_size
            n = self.sizes[k]
            nb = n // g if self.drop_last else math.ceil(n / g)
            if nb == 0:
                raise DataError(
                    f"dataset {k}: {n} rows, fewer than one global batch "
                    f"(batch_size {b} x {self.world_size} workers = {g}); lower its batch_size or add rows"
                )
            self.global_batch[k] = g
            self.batches_per_epoch[k] = nb

        self.step = 0  # next step to run (advanced by iter_rank, saved by state_dict)
        self._plan = self._build_plan()
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}
        log.info(self.describe())

    # ------------------------------------------------------------------ plan
    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *keys])

    def _natural_steps(self, name: str) -> int:
        return math.floor(self.epochs * self.batches_per_epoch[name] + 1e-9)

    def _total(self) -> int:
        if self.max_steps is not None:
            return self.max_steps
        return sum(self._natural_steps(k) for k in self.names)

    def probabilities(self) -> dict[str, float]:
        """p_k ∝ nb_k^(1/T) of the temperature policy (nb_k = full global batches per epoch)."""
        raw = {k: self.batches_per_epoch[k] ** (1.0 / self.temperature) for k in self.names}
        z = sum(raw.values())
        return {k: v / z for k, v in raw.items()}

    def _build_plan(self) -> list[tuple[str, int]]:
        total = self._total()
        if self.policy == "proportional":
            labels = self._proportional_labels(total)
        elif self.policy == "round_robin":
            labels = [self.names[t % len(self.names)] for t in range(total)]
        else:
            p = self.probabilities()
            rng = self._rng(1)
            idx = rng.choice(len(self.names), size=total, p=[p[k] for k in self.names])
            labels = [self.names[i] for i in idx]
        counters: Counter[str] = Counter()
        plan = []
        for name in labels:
            plan.append((name, counters[name]))
            counters[name] += 1
        return plan

    def _proportional_labels(self, total: int) -> list[str]:
        labels: list[str] = []
        e = 0
        limit = None if self.max_steps is not None else self.epochs  # max_steps: as many epochs as needed
        while len(labels) < total:
            block: list[str] = []
            for k in self.names:
                nb = self.batches_per_epoch[k]
                hi = nb if limit is None else math.floor(min(limit, e + 1) * nb + 1e-9)
                lo = 0 if limit is None else math.floor(min(limit, e) * nb + 1e-9)
                block += [k] * (hi - lo)
            if not block:
                break
            order = self._rng(2, e).permutation(len(block))
            labels += [block[i] for i in order]
            e += 1
        return labels[:total]

    def plan(self) -> list[tuple[str, int]]:
        """The whole schedule: one ``(dataset name, dataset-local batch counter)`` per global step."""
        return list(self._plan)

    def __len__(self) -> int:
        return len(self._plan)

    def steps_per_task(self) -> dict[str, int]:
        """Steps each dataset gets in the plan (every dataset listed, 0 included)."""
        counts = Counter(name for name, _ in self._plan)
        return {k: counts.get(k, 0) for k in self.names}

    # ------------------------------------------------------------------ rows
    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        key = (name, epoch)
        perm = self._perm_cache.get(key)
        if perm is None:
            if len(self._perm_cache) > 64:
                self._perm_cache.clear()
            perm = self._rng(3, zlib.crc32(name.encode("utf-8")), epoch).permutation(self.sizes[name])
            self._perm_cache[key] = perm
        return perm

    def _hashes(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        h = self._row_hashes[name]
        if callable(h):
            h = self._row_hashes[name] = h()
        offsets, values = np.asarray(h[0], np.int64), np.asarray(h[1], np.int64)
        if len(offsets) != self.sizes[name] + 1:
            raise DataError(f"dataset {name}: row hashes for {len(offsets) - 1} rows, the dataset has {self.sizes[name]}")
        return offsets, values

    def _arranged(self, name: str, epoch: int) -> np.ndarray:
        """Epoch ``epoch`` of a no-duplicates dataset: nb × G row ids (see the module docstring)."""
        from codiemb.data.nodup import remove_duplicates

        key = ("nodup", name, epoch)
        hit = self._perm_cache.get(key)
        if hit is not None:
            return hit
        perm = self._permutation(name, epoch)
        nb, g, n = self.batches_per_epoch[name], self.global_batch[name], self.sizes[name]
        if nb * g <= n:
            batches, spare = perm[: nb * g].reshape(nb, g).copy(), perm[nb * g:].copy()
        else:  # drop_last=False: topped up from the start of the permutation, as without the option
            batches, spare = np.concatenate([perm, perm[: nb * g - n]]).reshape(nb, g), None
        offsets, values = self._hashes(name)
        stats = remove_duplicates(batches, offsets, values, spare)
        if (name, epoch) not in self.swap_stats:
            self.swap_stats[(name, epoch)] = stats
            if stats.conflicted:
                log.info("no-duplicates: dataset %s epoch %d: %d of %d batches needed a swap (%d rows swapped), "
                         "%d kept a duplicate (no partner found)", name, epoch, stats.swapped, nb, stats.swaps,
                         stats.unresolved)
        self._perm_cache[key] = batches
        return batches

    def swap_summary(self) -> dict[str, dict[str, int]]:
        """Per no-duplicates dataset, over the epochs arranged so far: batches, batches that needed a
        swap, rows swapped, batches left with a duplicate."""
        out = {k: {"epochs": 0, "batches": 0, "swapped": 0, "swaps": 0, "unresolved": 0} for k in self.no_duplicates}
        for (name, _), s in self.swap_stats.items():
            o = out[name]
            o["epochs"] += 1
            o["batches"] += s.batches
            o["swapped"] += s.swapped
            o["swaps"] += s.swaps
            o["unresolved"] += s.unresolved
        return out

    def global_rows(self, step: int) -> tuple[str, list[int]]:
        """Dataset name and all G_k row indices of global step ``step`` (rank slices in order)."""
        if not 0 <= step < len(self._plan):
            raise IndexError(f"step {step} outside the plan of {len(self._plan)} steps")
        name, c = self._plan[step]
        nb, g = self.batches_per_epoch[name], self.global_batch[name]
        epoch, j = divmod(c, nb)
        if name in self._row_hashes:
            return name, self._arranged(name, epoch)[j].tolist()
        perm = self._permutation(name, epoch)
        rows = perm[j * g : (j + 1) * g]
        if len(rows) < g:  # drop_last=False: top up from the start of this epoch's permutation
            rows = np.concatenate([rows, perm[: g - len(rows)]])
        return name, rows.tolist()

    def batch(self, step: int, rank: int) -> tuple[str, list[int]]:
        """Dataset name and rank ``rank``'s row indices (exactly batch_sizes[name]) at global step ``step``."""
        if not 0 <= rank < self.world_size:
            raise IndexError(f"rank {rank} outside world_size {self.world_size}")
        name, rows = self.global_rows(step)
        b = self.batch_sizes[name]
        return name, rows[rank * b : (rank + 1) * b]

    def iter_rank(self, rank: int, start: int | None = None):
        """Yield ``(step, name, rows)`` for ``rank`` from ``start`` (default: ``self.step``).

        ``self.step`` becomes step + 1 as each step is handed out, so ``state_dict()`` taken after
        the loop finished a step resumes at the next one.
        """
        step = self.step if start is None else int(start)
        while step < len(self._plan):
            name, rows = self.batch(step, rank)
            self.step = step + 1
            yield step, name, rows
            step += 1

    # ------------------------------------------------------------------ resume
    def _signature(self) -> dict[str, Any]:
        return {
            "sizes": dict(self.sizes),
            "batch_sizes": dict(self.batch_sizes),
            "world_size": self.world_size,
            "policy": self.policy,
            "temperature": self.temperature,
            "epochs": self.epochs,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "max_steps": self.max_steps,
            "no_duplicates": list(self.no_duplicates),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything that defines the plan, plus the next step to run."""
        return {**self._signature(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state["step"]``; refuses a state made for a different plan."""
        saved = {k: state.get(k) for k in self._signature()}
        saved["sizes"] = dict(saved["sizes"] or {})
        saved["batch_sizes"] = dict(saved["batch_sizes"] or {})
        saved["no_duplicates"] = list(saved["no_duplicates"] or [])  # states saved before the option: none
        diff = [k for k, v in self._signature().items() if saved[k] != v]
        if diff:
            raise ConfigError(
                "cannot resume: the sampler state was saved for a different schedule ("
                + ", ".join(f"{k}: saved {saved[k]!r}, now {getattr(self, k)!r}" for k in diff)
                + ")"
            )
        step = int(state["step"])
        if not 0 <= step <= len(self._plan):
            raise ConfigError(f"cannot resume: saved step {step} outside the plan of {len(self._plan)} steps")
        self.step = step

    def describe(self) -> str:
        """One line for the log: policy, total steps and the steps each task got."""
        per = ", ".join(f"{k}={v}" for k, v in self.steps_per_task().items())
        return f"TaskBatchSampler policy={self.policy} steps={len(self)} world_size={self.world_size}: {per}"
