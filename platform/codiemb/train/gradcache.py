"""GradCache: a step's contrastive batch no longer bounded by activation memory (``train.mini_batch_size``).

Gao, Zhang, Han, Callan 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup" (arXiv 2101.06983); the technique of sentence-transformers'
``CachedMultipleNegativesRankingLoss`` (its ``RandContext`` is kept here as it is there, after
luyug/GradCache). The loss of a step is computed over ALL its texts' embeddings, but the encoder
runs on at most ``mini_batch_size`` texts at a time:

1. :meth:`GradCache.embed`: each chunk through the encoder under ``torch.no_grad`` (its RNG state
   saved, so dropout repeats exactly in 3.); the outputs are concatenated and made leaf tensors
   that require grad.
2. The caller computes the loss from those leaves with the code it uses without GradCache (the
   cross-worker ``all_gather``, Matryoshka wrappers, STS losses: unchanged) and backpropagates
   it: the gradients stop at the leaves (d loss / d embedding, kept in their ``.grad``).
3. :meth:`GradCache.backward`: each chunk again, with grad, under its saved RNG and autocast
   state, then ``torch.autograd.backward(chunk outputs, their cached gradients)``: the parameter
   gradients accumulate chunk by chunk and sum to the full batch's.

Peak activation memory is that of one chunk; what still grows with the batch is small (the
embeddings, their gradients, the similarity matrix). Cost: one more forward per step.

**DDP.** Gradients must be all-reduced once per step. Only the LAST chunk of the step runs through
the DDP wrapper with grad (its backward all-reduces the accumulated sums, as after
``no_sync()``); every other forward, of both passes, calls the wrapped module directly, which
accumulates locally exactly as ``no_sync()`` does. Not ``no_sync()`` itself: a DDP forward may run
collectives (buffer broadcast, bucket rebuild), and ranks can have different numbers of chunks
(the filled passage slots differ per rank), so each rank runs exactly ONE DDP forward per step.
The caller's ``run(i, j, ddp)`` gets ``ddp=True`` for that one chunk only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import get_device_states, set_device_states

# run(i, j, ddp) -> the encoder outputs of rows i..j: a tensor, or a dict of tensors / dicts
# (``{"embedding": (n, D), "layer_embeddings": {l: (n, D)}}``), rows first
Run = Callable[[int, int, bool], Any]


class RandContext:
    """Saves the CPU (and CUDA device) RNG state now; entering restores it, leaving puts back
    the state from before entering (sentence-transformers' ``RandContext``)."""

    def __init__(self, *tensors: Tensor) -> None:
        self.fwd_cpu_state = torch.get_rng_state()
        self.fwd_gpu_devices, self.fwd_gpu_states = get_device_states(*tensors)

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.fwd_gpu_devices, enabled=True)
        self._fork.__enter__()
        torch.set_rng_state(self.fwd_cpu_state)
        set_device_states(self.fwd_gpu_devices, self.fwd_gpu_states)

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self._fork.__exit__(exc_type, exc_val, exc_tb)
        self._fork = None


@dataclass
class _Call:
    run: Run
    spans: list[tuple[int, int, RandContext]]
    leaves: Any  # the concatenated outputs, detached, requires_grad (what the loss saw)
    autocast: tuple[str, bool, torch.dtype]


class GradCache:
    """The cached forwards of one step: :meth:`embed` any number of times, compute and
    backpropagate the loss, then :meth:`backward` once (which also forgets the step)."""

    def __init__(self, mini_batch_size: int, device: torch.device | str = "cpu") -> None:
        if int(mini_batch_size) < 1:
            raise ValueError(f"mini_batch_size must be >= 1, got {mini_batch_size}")
        self.mini_batch_size = int(mini_batch_size)
        self.device = torch.device(device)
        self._calls: list[_Call] = []

    def embed(self, run: Run, n: int):
        """Step 1 for ``n`` rows: ``run(i, j, False)`` chunk by chunk without grad; returns the
        concatenated outputs as leaves that require grad (same structure as ``run``'s)."""
        if n < 1:
            raise ValueError("GradCache.embed needs at least one row")
        kind = self.device.type
        autocast = (kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        probe = (torch.empty(0, device=self.device),) if kind == "cuda" else ()
        spans, outs = [], []
        for i in range(0, n, self.mini_batch_size):
            j = min(n, i + self.mini_batch_size)
            state = RandContext(*probe)
            with torch.no_grad():
                outs.append(run(i, j, False))
            spans.append((i, j, state))
        leaves = _map(lambda t: t.detach().requires_grad_(), _cat(outs))
        self._calls.append(_Call(run, spans, leaves, autocast))
        return leaves

    def backward(self) -> None:
        """Step 3: re-run every chunk with grad and backpropagate its cached embedding gradients
        (the caller has run step 2's ``loss.backward()``). Leaves the step's record empty."""
        calls, self._calls = self._calls, []
        if not calls:
            raise RuntimeError("GradCache.backward without a cached forward (GradCache.embed) in this step")
        last = (len(calls) - 1, len(calls[-1].spans) - 1)
        for c, call in enumerate(calls):
            # a leaf the loss did not use (e.g. a layer 2D Matryoshka did not draw) gets zeros, so
            # every output of the DDP chunk takes part in its backward
            grads = _map(lambda t: t.grad if t.grad is not None else torch.zeros_like(t), call.leaves)
            kind, enabled, dtype = call.autocast
            for s, (i, j, state) in enumerate(call.spans):
                with state, torch.autocast(kind, dtype=dtype, enabled=enabled):
                    out = call.run(i, j, (c, s) == last)
                tensors, chunk_grads = _pairs(out, grads, i, j)
                torch.autograd.backward(tensors, chunk_grads)


def row_chunk(features: dict[str, Tensor], i: int, j: int) -> dict[str, Tensor]:
    """Rows i..j of a right-padded batch (``fast_batches.pad_ids``), cut to their own longest
    text: a chunk never computes the padding that only a longer text elsewhere needed."""
    width = int(features["attention_mask"][i:j].sum(dim=1).max())
    return {k: (v[i:j, :width] if v.dim() == 2 else v[i:j]) for k, v in features.items()}


# --------------------------------------------------------------------------- output trees
def _cat(outs: list):
    if isinstance(outs[0], Tensor):
        return torch.cat(outs)
    return {k: _cat([o[k] for o in outs]) for k in outs[0]}


def _map(fn, tree):
    if isinstance(tree, Tensor):
        return fn(tree)
    return {k: _map(fn, v) for k, v in tree.items()}


def _pairs(out, grads, i: int, j: int) -> tuple[list[Tensor], list[Tensor]]:
    """(chunk output tensors, rows i..j of their cached gradients), matched key by key."""
    if isinstance(grads, Tensor):
        return [out], [grads[i:j]]
    tensors, gs = [], []
    for k, g in grads.items():
        t, h = _pairs(out[k], g, i, j)
        tensors += t
        gs += h
    return tensors, gs
