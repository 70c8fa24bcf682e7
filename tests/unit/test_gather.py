"""W=2 workers × B rows == 1 worker × 2B rows: same loss, same gradients (gloo, 2 processes).

Gradient convention checked here (the training loop does exactly this, like torch DDP):
every rank runs ``backward`` on its loss, then each parameter gradient is all-reduced with SUM
and divided by the world size (averaged). The result must equal the gradient of one process
holding the concatenated batch.

``info_nce`` computes only each rank's queries against all gathered candidates (B × N(1+n)
logits); it is checked against the former full-matrix version (every rank: N × N(1+n) over the
gathered batch), kept here as ``full_matrix_info_nce``: same loss, same averaged gradients, and
even the same rank-local gradients before averaging.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from codiemb.config import StsLossConfig
from codiemb.losses.distributed import gather_with_grad, world_info
from codiemb.losses.ir import info_nce
from codiemb.losses.sts import sts_loss

WORLD = 2
B = 3  # rows per rank
M, N = 2, 2  # positives, negatives per query
D_IN, D = 5, 8
Y = torch.tensor([4.0, 1.0, 4.0, 0.0, 2.5, 5.0])  # global STS scores, with a tie across ranks
Y_ONE_SIDED = torch.tensor([4.0, 5.0, 3.5, 0.0, 1.0, 2.5])  # MidNCE (ŷ ≥ 0.6): rank 0 has pairs, rank 1 none
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


def full_matrix_info_nce(q, passages, m, temperature):
    """The former ``info_nce`` on the whole (gathered) batch: N × N(1+n) logits for every j."""
    q, p = F.normalize(q, dim=-1), F.normalize(passages, dim=-1)
    N, D = q.shape
    n = p.shape[1] - m
    targets = torch.arange(N)
    neg = q @ p[:, m:, :].reshape(N * n, D).T / temperature
    total = q.new_zeros(())
    for j in range(m):
        logits = torch.cat([q @ p[:, j, :].T / temperature, neg], dim=1)
        assert logits.shape == (N, N * (1 + n))
        total = total + F.cross_entropy(logits, targets)
    return total / m


IR_CASES = {"m2n2": (M, N), "m1n0": (1, 0), "m3n1": (3, 1)}  # (positives, negatives) per query


def _ir_inputs(head, data, rows, case):
    m, n = IR_CASES[case]
    return head(data["q"][rows]), head(data["p"][rows][:, : m + n]), m


def _compute(rows: slice, gather: bool):
    """Loss values and parameter gradients for the rows ``rows`` of the fixed batch."""
    data = _data()
    head, mid = _model()
    out = {}
    for case in IR_CASES:
        q, p, m = _ir_inputs(head, data, rows, case)
        ir, stats = info_nce(q, p, num_positives=m, temperature=0.05, gather=gather, return_stats=True)
        ir.backward()
        key = "" if case == "m2n2" else "_" + case
        out["ir_loss" + key] = ir.detach()
        out["ir_stats" + key] = stats
        out["ir_grads" + key] = [p.grad.clone() for p in head.parameters()]
        head.zero_grad()
    for key, y in (("", Y), ("_one_sided", Y_ONE_SIDED)):
        x1, x2 = data["x1"][rows], data["x2"][rows]
        sts, parts = sts_loss(head(x1), head(x2), y[rows], STS_CFG, mid1=mid(x1), mid2=mid(x2), gather=gather)
        sts.backward()
        out["sts_loss" + key] = sts.detach()
        out["sts_parts" + key] = parts
        out["sts_grads" + key] = [p.grad.clone() for p in [*head.parameters(), *mid.parameters()]]
        head.zero_grad()
        mid.zero_grad()
    return out


def _full_matrix_reference(case: str, through_rows: slice | None = None):
    """One process, all W·B rows, the full-matrix loss. With ``through_rows``, the gradient flows
    only through those rows' embeddings (the other rows use detached weights) and is multiplied by
    W: what rank r got locally from the former version (W identical loss copies, each sending
    rank r's rows their gradient)."""
    data = _data()
    head, _ = _model()
    q, p, m = _ir_inputs(head, data, slice(0, WORLD * B), case)
    if through_rows is not None:
        keep = torch.zeros(WORLD * B, dtype=torch.bool)
        keep[through_rows] = True
        q = torch.where(keep[:, None], q, q.detach())
        p = torch.where(keep[:, None, None], p, p.detach())
    loss = full_matrix_info_nce(q, p, m, temperature=0.05)
    loss.backward()
    scale = WORLD if through_rows is not None else 1
    return loss.detach(), [scale * p.grad.clone() for p in head.parameters()]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        assert world_info() == (rank, WORLD)
        gathered = gather_with_grad(torch.full((2,), float(rank)))
        out = _compute(slice(rank * B, (rank + 1) * B), gather=True)
        out["gathered"] = gathered
        out["local_ir_grads"] = [g.clone() for g in out["ir_grads"]]
        grad_keys = [k for k in out if k.startswith(("ir_grads", "sts_grads"))]
        for key in grad_keys:  # what the loop does: average gradients over ranks
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


@pytest.mark.parametrize("case", list(IR_CASES))
def test_info_nce_local_queries_equal_the_full_matrix(ranks, single, case):
    """Each rank's B × N(1+n) version == the former N × N(1+n) version on one process (rtol 1e-5):
    the loss (on every rank), the averaged gradients, and each rank's own gradient before averaging."""
    m, n = IR_CASES[case]
    key = "" if case == "m2n2" else "_" + case
    ref_loss, ref_grads = _full_matrix_reference(case)
    torch.testing.assert_close(single["ir_loss" + key], ref_loss, rtol=1e-5, atol=1e-7)
    for r, out in enumerate(ranks):
        assert out["ir_stats" + key]["logits_shape"] == (B, WORLD * B * (1 + n))
        assert out["ir_stats" + key]["local_queries"] == B
        assert out["ir_stats" + key]["candidates"] == WORLD * B * (1 + n)
        torch.testing.assert_close(out["ir_loss" + key], ref_loss, rtol=1e-5, atol=1e-7)
        for g, want in zip(out["ir_grads" + key], ref_grads):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)
    # before averaging, rank r's gradient is what the former version gave rank r
    for r, out in enumerate(ranks):
        if case != "m2n2":
            break
        _, local_ref = _full_matrix_reference(case, through_rows=slice(r * B, (r + 1) * B))
        for g, want in zip(out["local_ir_grads"], local_ref):
            torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("key", ["", "_one_sided"])
def test_sts_loss_two_workers_equal_one_worker(ranks, single, key):
    for out in ranks:
        torch.testing.assert_close(out["sts_loss" + key], single["sts_loss" + key], rtol=1e-5, atol=1e-7)
        for k, v in single["sts_parts" + key].items():
            assert out["sts_parts" + key][k] == pytest.approx(v, rel=1e-5), k
        for g, ref in zip(out["sts_grads" + key], single["sts_grads" + key]):
            # atol 1e-6: float32 sums of O(1) terms (weights up to 5); in float64 the two agree to 1e-12
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
    assert single["sts_parts" + key]["mid_nce"] > 0  # the middle-layer term really ran (y ≥ 0.6 exists)


def test_without_process_group_gather_is_identity():
    x = torch.randn(3, 2)
    assert world_info() == (0, 1)
    assert gather_with_grad(x) is x
