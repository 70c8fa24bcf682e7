"""Rows with 0, 1 and 3 hard negatives, the config asking for 3, on two gloo ranks whose rows differ.

Every row of the dataset gets 3 negative slots on every rank (the count is the dataset's, from the
config and the manifest, never the minimum of one rank's rows), so the gathered tensors agree in
shape (no hang) and the empty slots are masked out of InfoNCE. The loss must equal (rtol 1e-5):

- one process holding all rows (W x B == 1 x W*B), and
- a reference written out here by hand: for every query, -log softmax over only the candidates
  that exist (its positive, every other query's positive, every real negative in the batch).
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD, B, TAU = 2, 2, 0.05
ROWS = [  # rank 0 holds rows 0-1 (0 and 1 negatives), rank 1 rows 2-3 (3 negatives each)
    {"query": "the cat sleeps", "positives": ["a cat is sleeping"], "negatives": []},
    {"query": "dogs eat", "positives": ["the dog eats food"], "negatives": ["a red car"]},
    {"query": "water is blue", "positives": ["blue water"], "negatives": ["fire is red", "the sun", "a tree"]},
    {"query": "protein in cells", "positives": ["cell protein study"], "negatives": ["a house", "the moon", "cats"]},
]


def _cfg(model_dir: str):
    from codiemb.config import config_from_dict

    return config_from_dict({"model": {"name": model_dir, "max_length": {"query": 16, "passage": 16}},
                             "loss": {"retrieval": {"temperature": TAU, "negatives": 3}},
                             "train": {"retrieval_forward": "padded"}})


def _loss(model_dir: str, rank: int, world: int):
    from codiemb.model.encoder import Encoder
    from codiemb.train.loop import DistContext, make_task_data, retrieval_loss

    cfg = _cfg(model_dir)
    enc = Encoder.load(model_dir)
    enc.eval()
    ds = type("DS", (), {"name": "ret", "task": "retrieval", "batch_size": len(ROWS) // world, "instruction": None,
                         "score_range": None, "negatives": None})()
    td = make_task_data(cfg, ds, ROWS)
    assert (td.num_positives, td.num_negatives) == (1, 3)  # fixed by config and data, not by this rank's rows
    b = len(ROWS) // world
    idx = list(range(rank * b, (rank + 1) * b))
    loss, extra, _ = retrieval_loss(enc, None, td, cfg, DistContext(rank=rank, world_size=world), random.Random(0),
                                    idx=idx)
    return float(loss.detach()), extra


def _worker(rank: int, init_file: str, out_dir: str, model_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=__import__("datetime").timedelta(seconds=60))
    try:
        loss, extra = _loss(model_dir, rank, WORLD)
        torch.save({"loss": loss, "empty": extra["empty_slots"]}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def _by_hand(model_dir: str) -> float:
    """Multi-positive InfoNCE (m = 1) over the rows' real texts only, one query at a time."""
    from codiemb.model.encoder import Encoder

    enc = Encoder.load(model_dir)
    enc.eval()
    with torch.no_grad():
        emb = lambda texts: F.normalize(enc(enc.tokenize(texts, 16))["embedding"], dim=-1)  # noqa: E731
        q = emb([r["query"] for r in ROWS])
        pos = emb([r["positives"][0] for r in ROWS])
        negs = emb([t for r in ROWS for t in r["negatives"]])
    cands = torch.cat([pos, negs])  # every positive of the batch, then every real negative
    losses = [-torch.log_softmax(q[i] @ cands.T / TAU, dim=0)[i] for i in range(len(ROWS))]
    return float(torch.stack(losses).mean())


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, nodrop_model_dir):
    tmp = tmp_path_factory.mktemp("uneven")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp), str(nodrop_model_dir)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


def test_two_ranks_with_uneven_negatives_match_the_masked_reference(ranks, nodrop_model_dir):
    one, _ = _loss(str(nodrop_model_dir), 0, 1)
    ref = _by_hand(str(nodrop_model_dir))
    assert one == pytest.approx(ref, rel=1e-5)
    for out in ranks:
        assert out["loss"] == pytest.approx(ref, rel=1e-5)
    assert [r["empty"] for r in ranks] == [5.0, 0.0]  # rank 0: 3 + 2 empty negative slots, rank 1: none


def test_masked_info_nce_equals_unmasked_when_every_slot_is_filled():
    from codiemb.losses.ir import info_nce

    g = torch.Generator().manual_seed(0)
    q, p = torch.randn(4, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    full = torch.ones(4, 3, dtype=torch.bool)
    assert float(info_nce(q, p, 2, gather=False, mask=full)) == pytest.approx(float(info_nce(q, p, 2, gather=False)),
                                                                               rel=1e-6)
    # an empty slot changes the loss (it really is removed from the candidates)
    some = full.clone()
    some[0, 2] = False
    assert float(info_nce(q, p, 2, temperature=1.0, gather=False, mask=some)) != pytest.approx(
        float(info_nce(q, p, 2, temperature=1.0, gather=False)), rel=1e-3)
