"""Embedding a list of texts across the ranks of a torch.distributed group, for evaluation.

``ctx`` is anything with ``.rank``, ``.world_size`` and ``.device`` (``codiemb.train.loop.DistContext``);
``None`` or ``world_size == 1`` means one process and plain ``encoder.encode``.

:func:`encode_texts` cuts the texts into exactly the batches ``Encoder.encode`` would use (longest
first, ``batch_size`` each), gives rank ``r`` the batches ``r, r+W, r+2W, ...``, and all-gathers the
embeddings (slices padded to the longest, then unpadded), so every rank ends with the embeddings
of all texts in input order. Each batch is the same tensor as on one process, so W ranks give
the same numbers as one (bit for bit on the same hardware). Collectives run on ``ctx.device``
when it is a GPU (NCCL), else on CPU (gloo).
"""

from __future__ import annotations

import numpy as np
import torch


def world(ctx) -> tuple[int, int]:
    if ctx is None:
        return 0, 1
    return int(ctx.rank), int(ctx.world_size)


def _comm_device(ctx) -> torch.device:
    dev = torch.device(getattr(ctx, "device", None) or "cpu")
    return dev if dev.type == "cuda" else torch.device("cpu")


def encode_texts(encoder, texts: list[str], *, batch_size: int = 64, max_length: int | None = None,
                 instruction: str | None = None, ctx=None, show_progress: bool = False, progress=None) -> np.ndarray:
    """L2-normalised float32 embeddings (N, D) of ``texts``, computed by all ranks of ``ctx`` together.

    ``progress`` (one process only): a tqdm-like bar moved by the number of texts of each batch."""
    rank, size = world(ctx)
    texts = list(texts)
    if size <= 1:
        emb = encoder.encode(texts, batch_size=batch_size, max_length=max_length, instruction=instruction,
                             normalize=True, show_progress=show_progress,
                             **({"progress": progress} if progress is not None else {}))
        return np.asarray(torch.as_tensor(emb, dtype=torch.float32).numpy(), dtype=np.float32)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # Encoder.encode's order
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    mine = [i for b in batches[rank::size] for i in b]
    parts = [encoder.encode([texts[i] for i in b], batch_size=len(b), max_length=max_length,
                            instruction=instruction, normalize=True) for b in batches[rank::size]]
    local = torch.cat(parts).float() if parts else torch.zeros(0, encoder.dim)
    idx = torch.tensor(mine, dtype=torch.long)
    emb_all, idx_all = gather_rows(local, idx, ctx)
    out = torch.empty(len(texts), local.size(1), dtype=torch.float32)
    out[idx_all] = emb_all
    return out.numpy()


def gather_rows(rows: torch.Tensor, index: torch.Tensor, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather ``rows`` (n_r, D) and their ``index`` (n_r,) from every rank; slices may differ in size."""
    import torch.distributed as dist

    _, size = world(ctx)
    dev = _comm_device(ctx)
    n = torch.tensor([rows.size(0)], dtype=torch.long, device=dev)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    counts = [int(c.item()) for c in counts]
    longest = max(counts)
    pad = torch.zeros(longest, rows.size(1), dtype=torch.float32, device=dev)
    pad[: rows.size(0)] = rows.to(dev, torch.float32)
    pad_idx = torch.full((longest,), -1, dtype=torch.long, device=dev)
    pad_idx[: index.numel()] = index.to(dev)
    got = [torch.empty_like(pad) for _ in range(size)]
    got_idx = [torch.empty_like(pad_idx) for _ in range(size)]
    dist.all_gather(got, pad)
    dist.all_gather(got_idx, pad_idx)
    emb = torch.cat([g[:c] for g, c in zip(got, counts)]).cpu()
    idx = torch.cat([g[:c] for g, c in zip(got_idx, counts)]).cpu()
    return emb, idx


def broadcast_object(obj, ctx):
    """Rank 0's ``obj`` on every rank (identity with one process)."""
    _, size = world(ctx)
    if size <= 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_comm_device(ctx) if dist.get_backend() == "nccl" else None)
    return box[0]
