"""The loop's unpadded retrieval step equals the padded one (loss, every gradient, tokens, rng calls).

Reference: the padded path (``Encoder.tokenize`` + the Hugging Face forward), which the rest of
the suite checks against sentence-transformers. Dropout is switched off (p = 0) so both paths are
deterministic; everything else (train mode, Matryoshka dims, gradient checkpointing, the
cross-worker gather on 2 gloo processes) is the real code.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codiemb.config import config_from_dict
from codiemb.errors import ConfigError
from codiemb.model.encoder import Encoder
from codiemb.train.loop import DistContext, TaskData, retrieval_forward, retrieval_loss, train, wrap_for_ddp
from codiemb.train.unpadded import unsupported_reason

W = "cat dog man woman child car house tree water fire sun moon red blue green big small".split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(W) for _ in range(n))


def _rows(seed: int = 0, n_rows: int = 6, pos: tuple = (2, 3), neg: tuple = (2, 4)) -> list[dict]:
    """Rows whose texts run from 1 word to ~40 words (very different lengths, some truncated)."""
    rng = random.Random(seed)
    out = []
    for i in range(n_rows):
        out.append({
            "query": _text(rng, 1 + (i * 5) % 13),
            "positives": [_text(rng, rng.choice([1, 2, 25, 40])) for _ in range(rng.randint(*pos))],
            "negatives": [_text(rng, rng.choice([1, 3, 18, 40])) for _ in range(rng.randint(*neg))],
        })
    return out


def _cfg(model_dir, forward: str, **loss) -> object:
    return config_from_dict({
        "model": {"name": str(model_dir), "max_length": {"query": 12, "passage": 32, "sts": 16}},
        "loss": {"retrieval": {"temperature": 0.05, "positives": 2, "negatives": 2}, **loss},
        "train": {"retrieval_forward": forward},
    })


def _step(model_dir, forward: str, rows, *, idx=None, ckpt=False, **loss):
    cfg = _cfg(model_dir, forward, **loss)
    if ckpt:
        cfg = config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "gradient_checkpointing": True}})
    enc = Encoder.load(str(model_dir))
    enc.train()
    calls = []
    enc.backbone.register_forward_hook(lambda *a: calls.append(1))  # the HF (padded) forward ran
    td = TaskData(name="ret", task="retrieval", records=rows, batch_size=len(rows), num_positives=2, num_negatives=2)
    rng = random.Random(11)
    loss, extra, tokens = retrieval_loss(enc, rows, td, cfg, DistContext(), rng, idx=idx)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in enc.backbone.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "tokens": tokens, "extra": extra, "hf_calls": len(calls),
            "rng_next": rng.random(), "enc": enc, "cfg": cfg}


def _assert_same(a, b):
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-6)
    assert a["grads"].keys() == b["grads"].keys()
    assert len(a["grads"]) > 20  # embeddings + every layer's weights
    for n in a["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def _independent_token_count(enc, rows, rng_seed=11, m=2, n=2, ml_q=12, ml_p=32) -> int:
    """Non-pad tokens of the batch, counted from the tokenizer text by text (no padding at all)."""
    rng = random.Random(rng_seed)
    count = 0
    for r in rows:
        count += len(enc.tokenizer(r["query"], truncation=True, max_length=ml_q)["input_ids"])
    for r in rows:
        for items, k in ((r["positives"], m), (r["negatives"], n)):
            chosen = items if len(items) <= k else rng.sample(items, k)
            count += sum(len(enc.tokenizer(t, truncation=True, max_length=ml_p)["input_ids"]) for t in chosen)
    return count


def test_unpadded_equals_padded_loss_gradients_tokens(nodrop_model_dir):
    rows = _rows()
    padded = _step(nodrop_model_dir, "padded", rows)
    unpadded = _step(nodrop_model_dir, "unpadded", rows, idx=list(range(len(rows))))
    assert padded["hf_calls"] == 2 and unpadded["hf_calls"] == 0  # really two different forwards
    _assert_same(unpadded, padded)
    assert unpadded["tokens"] == padded["tokens"] == _independent_token_count(padded["enc"], rows)
    assert unpadded["rng_next"] == padded["rng_next"]  # the same rng calls (resume determinism)
    assert unpadded["extra"] == padded["extra"]
    # lengths really differ: the padded batch would waste positions
    feats = padded["enc"].tokenize([t for r in rows for t in r["positives"]], 32)
    lengths = feats["attention_mask"].sum(1)
    assert int(lengths.min()) <= 4 and int(lengths.max()) == 32


def test_auto_is_unpadded_here_and_matches_with_matryoshka_subset_and_checkpointing(nodrop_model_dir):
    rows = _rows(seed=5)
    sub = [4, 1, 3]  # a batch of rows from the middle of the dataset: idx selects pre-tokenized rows
    mat = {"matryoshka": {"dims": [32, 16, 8]}}
    padded = _step(nodrop_model_dir, "padded", [rows[i] for i in sub], **mat)
    auto = _step(nodrop_model_dir, "auto", rows, idx=None, **mat)  # whole batch, tokenized on the fly
    assert auto["hf_calls"] == 0
    cfg = auto["cfg"]
    enc = Encoder.load(str(nodrop_model_dir))
    enc.train()
    td = TaskData(name="ret", task="retrieval", records=rows, batch_size=3, num_positives=2, num_negatives=2)
    loss, _, tokens = retrieval_loss(enc, [rows[i] for i in sub], td, cfg, DistContext(), random.Random(11), idx=sub)
    loss.backward()
    got = {"loss": loss.detach(), "grads": {n: p.grad for n, p in enc.backbone.named_parameters() if p.grad is not None}}
    _assert_same(got, padded)
    assert tokens == padded["tokens"]
    assert len(td.cache["store"][1]) == len(rows)  # the whole dataset was tokenized once
    ck = _step(nodrop_model_dir, "unpadded", rows, idx=list(range(len(rows))), ckpt=True, **mat)
    _assert_same(ck, auto)


def test_unpadded_impossible_is_a_config_error_and_auto_falls_back(nodrop_model_dir, tmp_path):
    rows = _rows(n_rows=3)
    enc = Encoder.load(str(nodrop_model_dir))
    td = TaskData(name="ret", task="retrieval", records=rows, batch_size=3, num_positives=2, num_negatives=2)
    inst = TaskData(name="inst", task="retrieval", records=rows, batch_size=3, instruction="query: ",
                    num_positives=2, num_negatives=2)
    assert retrieval_forward(_cfg(nodrop_model_dir, "auto"), enc, td) == "unpadded"
    with pytest.raises(ConfigError, match="instruction prefix"):
        retrieval_forward(_cfg(nodrop_model_dir, "unpadded"), enc, inst)
    assert retrieval_forward(_cfg(nodrop_model_dir, "auto"), enc, inst) == "padded"
    layered = {"matryoshka": {"dims": [32, 16], "layers": True}}
    with pytest.raises(ConfigError, match="matryoshka.layers"):
        retrieval_forward(_cfg(nodrop_model_dir, "unpadded", **layered), enc, td)
    assert retrieval_forward(_cfg(nodrop_model_dir, "auto", **layered), enc, td) == "padded"
    cls = Encoder.load(str(nodrop_model_dir), pooling="cls")
    with pytest.raises(ConfigError, match="pooling is 'cls'"):
        retrieval_forward(_cfg(nodrop_model_dir, "unpadded"), cls, td)
    assert retrieval_forward(_cfg(nodrop_model_dir, "padded"), enc, td) == "padded"
    # a row-level instruction counts too, and train() refuses before the first step
    data = tmp_path / "ret.jsonl"
    data.write_text("".join(json.dumps(dict(r, instruction="find: ")) + "\n" for r in rows))
    cfg = config_from_dict({**_cfg(nodrop_model_dir, "unpadded").to_dict(),
                            "data": {"datasets": [{"name": "r", "task": "retrieval", "path": str(data), "batch_size": 3}]}})
    with pytest.raises(ConfigError, match="dataset 'r' has an instruction prefix"):
        train(cfg, output_dir=tmp_path / "o")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()  # failed before the loop started


def test_roberta_backbone_is_refused_not_silently_wrong():
    from transformers import RobertaConfig, RobertaModel

    model = RobertaModel(RobertaConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, max_position_embeddings=40))
    # RoBERTa has embeddings + encoder.layer like BERT, but positions start after the padding index
    assert "roberta" in unsupported_reason(model)


def test_train_default_runs_unpadded_and_matches_padded_first_steps(nodrop_model_dir, tmp_path, caplog):
    rng = random.Random(0)
    data = tmp_path / "ret.jsonl"
    with open(data, "w") as fh:
        for _ in range(16):
            fh.write(json.dumps({"query": _text(rng, rng.randint(1, 8)),
                                 "positives": [_text(rng, rng.choice([2, 30]))],
                                 "negatives": [_text(rng, rng.choice([1, 20])) for _ in range(3)]}) + "\n")

    def run(forward):
        cfg = config_from_dict({
            "run": {"seed": 4}, "model": {"name": str(nodrop_model_dir), "max_length": {"query": 12, "passage": 32}},
            "data": {"datasets": [{"name": "r", "task": "retrieval", "path": str(data), "batch_size": 4}]},
            "loss": {"retrieval": {"temperature": 0.05, "negatives": 2}},
            "train": {"max_steps": 2, "lr": 1e-4, "warmup_ratio": 0.0, "log_every": 1, "checkpoint_every": 0,
                      "retrieval_forward": forward}})
        train(cfg, output_dir=tmp_path / forward)
        return [json.loads(x) for x in (tmp_path / forward / "metrics.jsonl").read_text().splitlines()]

    with caplog.at_level(logging.INFO, logger="codiemb"):
        auto = run("auto")
    assert "retrieval dataset r: unpadded forward" in caplog.text
    assert "read=16 valid=16 quarantined=0; token shards" in caplog.text  # tokenized once, into shards
    padded = run("padded")
    assert [m["step"] for m in auto] == [1, 2]
    assert auto[0]["loss/r"] == pytest.approx(padded[0]["loss/r"], rel=1e-5)
    assert auto[1]["loss/r"] == pytest.approx(padded[1]["loss/r"], rel=1e-3)


# --------------------------------------------------------------------------- 2 gloo processes
WORLD, B = 2, 3


def _gloo_rows() -> list[dict]:
    # exactly m = 2 positives and n = 2 negatives per row: no sampling, so the rng streams of the
    # two ranks and of the single process cannot differ
    return [dict(r, positives=r["positives"][:2], negatives=r["negatives"][:2]) for r in _rows(seed=9, n_rows=WORLD * B)]


def _gloo_worker(rank: int, init_file: str, out_dir: str, model_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        rows = _gloo_rows()
        cfg = _cfg(model_dir, "auto")
        enc = Encoder.load(model_dir)
        enc.train()
        ctx = DistContext(rank=rank, world_size=WORLD)
        td = TaskData(name="ret", task="retrieval", records=rows, batch_size=B, num_positives=2, num_negatives=2)
        idx = list(range(rank * B, (rank + 1) * B))
        forward = retrieval_forward(cfg, enc, td, ctx.device)
        ctx.model = wrap_for_ddp(enc, ctx)  # as train() does: DDP averages the gradients during backward
        loss, extra, tokens = retrieval_loss(enc, [rows[i] for i in idx], td, cfg, ctx, random.Random(rank), idx=idx)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in enc.backbone.named_parameters() if p.grad is not None}
        torch.save({"loss": loss.detach(), "grads": grads, "extra": extra, "tokens": tokens, "forward": forward},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_gloo_workers_unpadded_equal_one_padded_process(nodrop_model_dir, tmp_path):
    mp.spawn(_gloo_worker, args=(str(tmp_path / "init"), str(tmp_path), str(nodrop_model_dir)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    single = _step(nodrop_model_dir, "padded", _gloo_rows())
    assert [r["forward"] for r in ranks] == ["unpadded", "unpadded"]
    assert sum(r["tokens"] for r in ranks) == single["tokens"]
    assert ranks[0]["extra"]["negatives_per_query"] == WORLD * B * 3 - 1 == single["extra"]["negatives_per_query"]
    for r in ranks:
        _assert_same(r, single)
