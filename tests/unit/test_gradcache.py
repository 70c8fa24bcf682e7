"""GradCache (``train.mini_batch_size``, train/gradcache.py): the encoder in chunks, the same loss
and the same gradients (rtol 1e-5) as one forward over the whole batch.

Reference: the loop's own step without GradCache. Dropout is off (p = 0) where the two are
compared, since a chunked forward draws different dropout masks than a whole-batch one; that the
re-forward repeats its chunk's dropout exactly (``RandContext``) is checked separately, with
dropout on, against plain autograd through the same chunks. Everything else is the real code:
padded and unpadded retrieval forwards, masked empty slots, Matryoshka and 2D Matryoshka, the STS
composite with MidNCE, DDP and the cross-worker gather on 2 gloo processes, and train().
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codiemb.config import config_from_dict
from codiemb.losses.ir import info_nce
from codiemb.model.encoder import Encoder
from codiemb.train.gradcache import GradCache, row_chunk
from codiemb.train.loop import DistContext, TaskData, retrieval_loss, sts_loss_step, train, wrap_for_ddp

W = "cat dog man woman child car house tree water fire sun moon red blue green big small".split()
MB = 4  # mini_batch_size under test
RTOL, ATOL = 1e-5, 1e-7


def _close(got, want, name="", rtol=RTOL):
    """rtol 1e-5; entries near 0 (a chunk sums its rows in another order) to 1e-5 of the tensor's
    largest, floored at 1e-9: key biases' gradients are 0 in exact arithmetic (softmax is
    shift-invariant), float noise ~1e-11."""
    atol = max(rtol * float(want.abs().max()), 1e-9)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(W) for _ in range(n))


def _ret_rows(n_rows: int, seed: int = 0) -> list[dict]:
    """At most m = 2 positives and n = 2 negatives (no sampling: every process picks the same
    texts), some rows fewer (empty slots, masked), lengths from 1 to ~30 words."""
    rng = random.Random(seed)
    return [{"query": _text(rng, 1 + (i * 5) % 11),
             "positives": [_text(rng, rng.choice([1, 3, 25])) for _ in range(rng.randint(1, 2))],
             "negatives": [_text(rng, rng.choice([2, 30])) for _ in range(rng.randint(0, 2))]}
            for i in range(n_rows)]


def _sts_rows(n_rows: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"sentence1": _text(rng, rng.randint(1, 12)), "sentence2": _text(rng, rng.randint(1, 12)),
             "score": round(rng.uniform(0, 5), 1)} for _ in range(n_rows)]


def _cfg(model_dir, mb=None, forward="padded", **loss):
    return config_from_dict({
        "model": {"name": str(model_dir), "max_length": {"query": 12, "passage": 32, "sts": 16}},
        "loss": {"retrieval": {"temperature": 0.05, "positives": 2, "negatives": 2},
                 "sts": {"cosent": 0.5, "pearson": 2.0, "rank_kl": 5.0, "pro": 0.5, "mid_nce": 1.0,
                         "mid_nce_threshold": 0.5}, **loss},
        "train": {"retrieval_forward": forward, "mini_batch_size": mb},
    })


def _step(model_dir, task, rows, mb, *, forward="padded", ctx=None, enc=None, idx=None, **loss):
    """One step the loop's way: the task's loss, its backward, then GradCache's re-forward."""
    cfg = _cfg(model_dir, mb, forward, **loss)
    if enc is None:
        enc = Encoder.load(str(model_dir))
        enc.train()
    ctx = ctx or DistContext()
    ctx.gradcache = GradCache(mb, ctx.device) if mb else None
    calls = []
    hook = enc.backbone.embeddings.word_embeddings.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    sub = rows if idx is None else [rows[i] for i in idx]
    if task == "retrieval":
        td = TaskData(name="ret", task="retrieval", records=rows, batch_size=len(sub), num_positives=2, num_negatives=2)
        loss, extra, tokens = retrieval_loss(enc, sub, td, cfg, ctx, random.Random(11), idx=idx, layer_seed=5)
    else:
        td = TaskData(name="sts", task="sts", records=rows, batch_size=len(sub), score_range=(0.0, 5.0))
        loss, extra, tokens = sts_loss_step(enc, sub, td, cfg, ctx, layer_seed=5, idx=idx)
    loss.backward()
    if ctx.gradcache is not None:
        ctx.gradcache.backward()
    hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in enc.backbone.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "tokens": tokens, "extra": extra, "calls": calls}


def _assert_same(a, b):
    torch.testing.assert_close(a["loss"], b["loss"], rtol=RTOL, atol=ATOL)
    assert a["grads"].keys() == b["grads"].keys()
    assert len(a["grads"]) > 20  # embeddings + every layer's weights
    for n in a["grads"]:
        _close(a["grads"][n], b["grads"][n], n)
    assert a["tokens"] == b["tokens"] and a["extra"] == b["extra"]


# --------------------------------------------------------------------------- one process
CASES = {
    "ir_padded": ("retrieval", "padded", {}),
    "ir_unpadded": ("retrieval", "unpadded", {}),
    "ir_matryoshka": ("retrieval", "auto", {"matryoshka": {"dims": [32, 16, 8]}}),
    "ir_matryoshka_2d": ("retrieval", "padded", {"matryoshka": {"dims": [32, 16], "layers": True}}),
    "sts": ("sts", "padded", {}),
    "sts_matryoshka_2d": ("sts", "padded", {"matryoshka": {"dims": [32, 16], "layers": True}}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mini_batches_equal_one_forward(nodrop_model_dir, case):
    task, forward, loss = CASES[case]
    rows = _ret_rows(10) if task == "retrieval" else _sts_rows(10)
    whole = _step(nodrop_model_dir, task, rows, None, forward=forward, **loss)
    cached = _step(nodrop_model_dir, task, rows, MB, forward=forward, **loss)
    _assert_same(cached, whole)
    # the encoder really ran in chunks: twice (no grad, then with grad) per chunk of at most MB texts
    if task == "retrieval":
        passages = sum(min(len(r["positives"]), 2) + min(len(r["negatives"]), 2) for r in rows)
        texts = [10 + passages] if forward != "padded" else [10, passages]  # packed: one list; padded: two
    else:
        texts = [20]
    assert len(whole["calls"]) == len(texts)
    assert len(cached["calls"]) == 2 * sum(math.ceil(t / MB) for t in texts)
    if forward == "padded":
        assert max(cached["calls"]) == MB


def test_mini_batch_of_one_and_of_the_whole_batch(nodrop_model_dir):
    rows = _ret_rows(6, seed=3)
    whole = _step(nodrop_model_dir, "retrieval", rows, None)
    for mb in (1, 64):
        _assert_same(_step(nodrop_model_dir, "retrieval", rows, mb), whole)


def test_rand_context_replays_each_chunks_dropout(tiny_model_dir):
    """Dropout on: GradCache's gradients equal plain autograd through the SAME chunks from the same
    seed; so the re-forward drew each chunk's masks again (without RandContext they differ)."""
    texts = [_text(random.Random(i), 3 + i) for i in range(10)]

    def grads_of(cached: bool, restore: bool = True):
        enc = Encoder.load(str(tiny_model_dir))
        enc.train()
        feats = enc.tokenize(texts, 16)
        run = lambda i, j, ddp: enc(row_chunk(feats, i, j))["embedding"]  # noqa: E731
        torch.manual_seed(3)
        if cached:
            gc = GradCache(MB)
            emb = gc.embed(run, len(texts))
            if not restore:
                for call in gc._calls:
                    call.spans = [(i, j, _NoRestore()) for i, j, _ in call.spans]
        else:
            emb = torch.cat([run(i, min(i + MB, len(texts)), True) for i in range(0, len(texts), MB)])
        loss = info_nce(emb[:5], emb[5:].unsqueeze(1), 1, temperature=0.05)
        loss.backward()
        if cached:
            gc.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in enc.backbone.named_parameters() if p.grad is not None}

    ref_loss, ref = grads_of(False)
    loss, got = grads_of(True)
    torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL)
    for n in ref:
        _close(got[n], ref[n], n)
    # dropout is really on: a chunk replayed without its saved RNG state gives other gradients
    _, wrong = grads_of(True, restore=False)
    assert not torch.allclose(wrong["encoder.layer.0.attention.self.query.weight"],
                              ref["encoder.layer.0.attention.self.query.weight"], rtol=1e-3)


class _NoRestore:
    def __enter__(self):
        pass

    def __exit__(self, *exc):
        pass


def test_backward_without_embed_and_bad_size_are_errors():
    with pytest.raises(ValueError, match="mini_batch_size must be >= 1"):
        GradCache(0)
    with pytest.raises(RuntimeError, match="without a cached forward"):
        GradCache(2).backward()
    with pytest.raises(Exception, match="mini_batch_size"):
        config_from_dict({"train": {"mini_batch_size": 0}})


def test_train_with_mini_batches_follows_the_same_path(nodrop_model_dir, tmp_path):
    """The loop wires it: train() with mini_batch_size 2 takes the same steps (losses, weights)."""
    data = tmp_path / "ret.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _ret_rows(12, seed=7)))
    sts = tmp_path / "sts.jsonl"
    sts.write_text("".join(json.dumps(r) + "\n" for r in _sts_rows(12)))

    def run(mb):
        base = _cfg(nodrop_model_dir, mb, "auto").to_dict()
        cfg = config_from_dict({**base, "run": {"seed": 4},
                                "data": {"datasets": [
                                    {"name": "r", "task": "retrieval", "path": str(data), "batch_size": 6},
                                    {"name": "s", "task": "sts", "path": str(sts), "batch_size": 6,
                                     "score_range": [0, 5]}]},
                                "sampler": {"policy": "round_robin"},
                                "train": {**base["train"], "max_steps": 4, "lr": 1e-3, "warmup_ratio": 0.0,
                                          "log_every": 1, "checkpoint_every": 0, "eval_at_end": False}})
        out = tmp_path / f"mb{mb}"
        train(cfg, output_dir=out)
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return metrics, Encoder.load(str(out / "model")).backbone.state_dict()

    (m_whole, w_whole), (m_cached, w_cached) = run(None), run(2)
    losses = lambda ms: [(k, v) for m in ms for k, v in m.items() if k.startswith("loss/")]  # noqa: E731
    assert {k for k, _ in losses(m_whole)} == {"loss/r", "loss/s"}
    for (k, a), (k2, b) in zip(losses(m_cached), losses(m_whole)):
        assert k == k2 and a == pytest.approx(b, rel=1e-4)
    start = Encoder.load(str(nodrop_model_dir)).backbone.state_dict()
    moved = sum(float((w_whole[k] - start[k]).abs().max()) for k in w_whole)
    assert moved > 1e-3  # the steps changed the weights ...
    for k in w_whole:  # ... and by the same amount with GradCache
        torch.testing.assert_close(w_cached[k], w_whole[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- 2 gloo processes
WORLD, B = 2, 5  # rows per rank: queries run as 2 chunks of <= MB, passages as 2-5 (differs by rank)


def _gloo_worker(rank: int, init_file: str, out_dir: str, model_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        idx = list(range(rank * B, (rank + 1) * B))
        out = {}
        for case, (task, forward, loss) in CASES.items():
            if case in ("ir_matryoshka",):
                continue
            rows = _ret_rows(WORLD * B, seed=9) if task == "retrieval" else _sts_rows(WORLD * B, seed=9)
            for mb in (None, MB):
                enc = Encoder.load(model_dir)
                enc.train()
                ctx = DistContext(rank=rank, world_size=WORLD)
                ctx.model = wrap_for_ddp(enc, ctx)  # as train() does: DDP averages the gradients
                res = _step(model_dir, task, rows, mb, forward=forward, ctx=ctx, enc=enc, idx=idx, **loss)
                res.pop("calls")
                out[(case, mb)] = res
        torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def gloo_ranks(nodrop_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gradcache-gloo")
    mp.spawn(_gloo_worker, args=(str(tmp / "init"), str(tmp), str(nodrop_model_dir)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("case", [c for c in CASES if c != "ir_matryoshka"])
def test_two_gloo_ranks_mini_batches_equal_one_forward_and_one_process(gloo_ranks, nodrop_model_dir, case):
    """Global batch fixed (2 ranks x B rows): mini_batch_size 4 == none on every rank (loss and the
    DDP-averaged gradients), and both == one process holding all 2B rows."""
    task, forward, loss = CASES[case]
    rows = _ret_rows(WORLD * B, seed=9) if task == "retrieval" else _sts_rows(WORLD * B, seed=9)
    single = _step(nodrop_model_dir, task, rows, None, forward=forward, **loss)
    for r in gloo_ranks:
        cached, whole = r[(case, MB)], r[(case, None)]
        torch.testing.assert_close(cached["loss"], whole["loss"], rtol=RTOL, atol=ATOL)
        for n in whole["grads"]:
            _close(cached["grads"][n], whole["grads"][n], n)
        torch.testing.assert_close(cached["loss"], single["loss"], rtol=1e-4, atol=1e-6)
        for n in single["grads"]:
            _close(cached["grads"][n], single["grads"][n], n, rtol=1e-4)  # 2 ranks vs 1: other sums
    if task == "retrieval":  # the ranks' passage counts differ: unequal numbers of chunks per rank
        rows_r = [rows[i * B:(i + 1) * B] for i in range(WORLD)]
        counts = [sum(min(len(x["positives"]), 2) + min(len(x["negatives"]), 2) for x in rr) for rr in rows_r]
        assert math.ceil(counts[0] / MB) != math.ceil(counts[1] / MB)


def test_memory_benchmark_measures_one_step(load_benchmark, tiny_model_dir):
    """benchmarks/gradcache_memory.py's per-setting measurement runs (its numbers: BENCHMARKS.md)."""
    bench = load_benchmark("gradcache_memory")
    got = bench.measure(str(tiny_model_dir), 8, MB, "cpu", "auto")
    assert got["batch"] == 8 and got["mini_batch_size"] == MB and got["tokens"] > 8
    assert got["step_peak_mib"] > 0 and got["before_mib"] > 0 and math.isfinite(got["loss"])
