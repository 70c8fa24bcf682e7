"""W=2 workers × B rows == 1 worker × 2B rows: same loss, same gradients (gloo, 2 processes).

Gradient convention checked here (the training loop does exactly this, like torch DDP):
every rank runs ``backward`` on its (identical) global loss, then each parameter gradient is
all-reduced with SUM and divided by the world size (averaged). The result must equal the
gradient of one process holding the concatenated batch.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codiemb.config import StsLossConfig
from codiemb.losses.distributed import gather_with_grad, world_info
from codiemb.losses.ir import info_nce
from codiemb.losses.sts import sts_loss

WORLD = 2
B = 3  # rows per rank
M, N = 2, 2  # positives, negatives per query
D_IN, D = 5, 8
Y = torch.tensor([4.0, 1.0, 4.0, 0.0, 2.5, 5.0])  # global STS scores, with a tie across ranks
STS_CFG = StsLossConfig(cosent=0.5, pearson=2.0, rank_kl=5.0, pro=0.5, mid_nce=1.0, mid_nce_threshold=0.6)


def _data():
    g = torch.Generator().manual_seed(123)
    return {
        "q": torch.randn(WORLD * B, D_IN, generator=g),
        "p": torch.randn(WORLD * B, M + N, D_IN, generator=g),
        "x1": torch.randn(WORLD * B, D_IN, generator=g),
        "x2": torch.randn(WORLD * B, D_IN, generator=g),
    }


def _model():
    torch.manual_seed(0)
    return torch.nn.Linear(D_IN, D), torch.nn.Linear(D_IN, D // 2)  # final head, "middle layer" head


def _compute(rows: slice, gather: bool):
    """Loss values and parameter gradients for the rows ``rows`` of the fixed batch."""
    data = _data()
    head, mid = _model()
    out = {}
    ir = info_nce(head(data["q"][rows]), head(data["p"][rows]), num_positives=M, temperature=0.05, gather=gather)
    ir.backward()
    out["ir_loss"] = ir.detach()
    out["ir_grads"] = [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    x1, x2 = data["x1"][rows], data["x2"][rows]
    sts, parts = sts_loss(head(x1), head(x2), Y[rows], STS_CFG, mid1=mid(x1), mid2=mid(x2), gather=gather)
    sts.backward()
    out["sts_loss"] = sts.detach()
    out["sts_parts"] = parts
    out["sts_grads"] = [p.grad.clone() for p in [*head.parameters(), *mid.parameters()]]
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert world_info() == (rank, WORLD)
        gathered = gather_with_grad(torch.full((2,), float(rank)))
        out = _compute(slice(rank * B, (rank + 1) * B), gather=True)
        out["gathered"] = gathered
        out["local_ir_grads"] = [g.clone() for g in out["ir_grads"]]
        for key in ("ir_grads", "sts_grads"):  # what the loop does: average gradients over ranks
            for g in out[key]:
                dist.all_reduce(g, op=dist.ReduceOp.SUM)
                g /= WORLD
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
        del out, gathered
    finally:
        # Without this, gloo work objects still holding tensors can outlive the group and abort the
        # process at interpreter exit (SIGABRT, "terminate called without an active exception").
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    return _compute(slice(0, WORLD * B), gather=False)


def test_gather_orders_by_rank(ranks):
    for out in ranks:
        assert out["gathered"].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_info_nce_two_workers_equal_one_worker(ranks, single):
    for out in ranks:
        torch.testing.assert_close(out["ir_loss"], single["ir_loss"], rtol=1e-5, atol=1e-7)
        for g, ref in zip(out["ir_grads"], single["ir_grads"]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    # the rank-local gradients differ (each only sees its rows' backward paths): averaging matters
    assert not torch.allclose(ranks[0]["local_ir_grads"][0], ranks[1]["local_ir_grads"][0])
    # and their average is the single-process gradient (sum would be W times it)
    avg = (ranks[0]["local_ir_grads"][0] + ranks[1]["local_ir_grads"][0]) / WORLD
    torch.testing.assert_close(avg, single["ir_grads"][0], rtol=1e-5, atol=1e-7)


def test_sts_loss_two_workers_equal_one_worker(ranks, single):
    for out in ranks:
        torch.testing.assert_close(out["sts_loss"], single["sts_loss"], rtol=1e-5, atol=1e-7)
        for k, v in single["sts_parts"].items():
            assert out["sts_parts"][k] == pytest.approx(v, rel=1e-5), k
        for g, ref in zip(out["sts_grads"], single["sts_grads"]):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    assert single["sts_parts"]["mid_nce"] > 0  # the middle-layer term really ran (y ≥ 0.6 exists)


def test_without_process_group_gather_is_identity():
    x = torch.randn(3, 2)
    assert world_info() == (0, 1)
    assert gather_with_grad(x) is x
