"""Smoke tests for the throughput benchmark (so the script cannot rot) and its fast-batch helpers.

The benchmark runs on the tiny model: 1 warm-up + 2 timed steps per side, one pair. The helpers
are checked against independent references: ``Encoder.tokenize`` for the padded batches and
torch's reference (for-loop) AdamW for the fused optimizer.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from codiemb.model.encoder import Encoder
from codiemb.train.fast_batches import PretokenizedRetrieval, bucketed_order, make_adamw, pad_ids

REPO = Path(__file__).resolve().parents[2]

ROWS = [
    {"query": "the cat runs", "positives": ["a cat runs in the house", "the cat"], "negatives": ["dog eats"]},
    {"query": "protein cell", "positives": ["gene protein cell study shows high risk"], "negatives": ["sun", "moon x"]},
    {"query": "a big red car is not a small blue car", "positives": ["car"], "negatives": ["tree water fire"]},
]


@pytest.fixture(autouse=True)
def _restore_threads():
    """The benchmarks call torch.set_num_threads; leave the test process as it was."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_pretokenized_batch_equals_encoder_tokenize(tiny_model_dir):
    enc = Encoder.load(str(tiny_model_dir))
    pre = PretokenizedRetrieval.build(enc.tokenizer, ROWS, {"query": 6, "passage": 5}, num_positives=1, num_negatives=1)
    idx = [2, 0, 1]
    rng_a, rng_b = random.Random(7), random.Random(7)
    qf, pf = pre.batch(idx, rng_a)
    ref_q = enc.tokenize([ROWS[i]["query"] for i in idx], 6)
    # the loop's choice rule: all positives/negatives when <= k, else rng.sample (same rng stream)
    texts = []
    for i in idx:
        for field in ("positives", "negatives"):
            items = ROWS[i][field]
            texts += list(items[:1]) if len(items) <= 1 else rng_b.sample(items, 1)
    ref_p = enc.tokenize(texts, 5)
    for got, ref in ((qf, ref_q), (pf, ref_p)):
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k], ref[k]), k
    # padded to the batch maximum, not to max_length: one short batch
    short_q, _ = pre.batch([0])
    assert short_q["input_ids"].shape[1] == int(enc.tokenize([ROWS[0]["query"]], 6)["attention_mask"].sum())


def test_pad_ids_right_pads_with_pad_id():
    out = pad_ids([[5, 6, 7], [8]], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_bucketed_order_is_a_partition_with_similar_lengths():
    lengths = [random.Random(i).randint(1, 300) for i in range(64)]
    batches = bucketed_order(lengths, 8, bucket_size=8, seed=3)  # one window: a full sort
    assert sorted(i for b in batches for i in b) == list(range(64))
    spans = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    for (lo1, hi1), (lo2, hi2) in zip(spans, spans[1:]):
        assert hi1 <= lo2  # batches cut from one sorted run do not overlap in length
    plain = bucketed_order(lengths, 8, bucket_size=1, seed=3)
    pad = lambda bs: sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in bs)  # noqa: E731
    assert pad(batches) < pad(plain)


def test_make_adamw_fused_matches_reference_adamw():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    b = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.LayerNorm(4))
    b.load_state_dict(a.state_dict())
    opt_a = make_adamw(a, 1e-2, 0.1, "cpu", fused=True)
    # reference: the for-loop implementation, same groups (decay only on the 2-D weight)
    opt_b = torch.optim.AdamW([{"params": [b[0].weight], "weight_decay": 0.1},
                               {"params": [b[0].bias, b[1].weight, b[1].bias], "weight_decay": 0.0}],
                              lr=1e-2, foreach=False)
    assert opt_a.defaults.get("fused") is True
    x = torch.randn(5, 6)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).sum().backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_throughput_script_runs_two_steps_per_side(load_benchmark, tiny_model_dir, shared_data, capsys, tmp_path,
                                                   monkeypatch):
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    import codiemb.train.loop as loop

    tp = load_benchmark("throughput")
    calls = []
    real = loop.retrieval_loss

    def counting(*a, **k):  # "ours" must be the training loop's own step
        calls.append(loop.retrieval_forward(a[3], a[0], a[2]))
        return real(*a, **k)

    monkeypatch.setattr(loop, "retrieval_loss", counting)
    argv = ["--model", str(tiny_model_dir), "--dataset", "scifact", "--data-root", str(shared_data),
            "--batch-size", "4", "--steps", "2", "--warmup", "1", "--pairs", "1", "--threads", "1",
            "--query-max-length", "16", "--passage-max-length", "32", "--max-rows", "24"]
    out_json = tmp_path / "res.json"
    assert tp.main(argv + ["--json", str(out_json)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == "command: python benchmarks/throughput.py " + " ".join(argv + ["--json", str(out_json)])
    assert "same batches check" in "\n".join(out) and out[[i for i, l in enumerate(out)
                                                           if "same batches check" in l][0]].endswith("yes")
    last = out[-1]
    assert last.startswith("ratio ours/peer samples/s: ")
    # the printed ratio is ours/peer from the table row
    row = next(l for l in out if l.startswith("| 1 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    ours, peer, ratio = float(cells[1]), float(cells[2]), float(cells[3])
    assert ours > 0 and peer > 0
    assert abs(ours / peer - ratio) < 0.01 + 0.01 * ratio
    assert last == f"ratio ours/peer samples/s: {ratio:.2f}"  # median of one pair
    res = json.loads(out_json.read_text())
    assert res["same_tokens"] is True
    assert res["pairs"][0]["samples"] == 4 * 2  # timed samples: batch x timed steps
    assert res["ours_all_tokens"] == res["peer_all_tokens"] > 0
    assert len(res["step_seconds"]["ours"]) == len(res["step_seconds"]["peer"]) == 1 + 2  # warm-up + timed
    # ours ran loop.retrieval_loss every step, on the loop's default (auto -> unpadded for this BERT)
    assert calls == ["unpadded"] * 3
    assert res["options"]["ours_attn"] == "auto" and res["ours_attn"] == "unpadded (batched)"
    assert any(l.startswith("ours: codiemb.train.loop.retrieval_loss, train.retrieval_forward=auto -> unpadded")
               for l in out)


@pytest.mark.parametrize("backend", ["reference", "batched"])
def test_unpadded_forward_equals_padded_encoder(tiny_model_dir, backend):
    from codiemb.train.unpadded import UnpaddedBert, mean_pool_packed, pack_lists, pack_padded

    enc = Encoder.load(str(tiny_model_dir)).eval()
    texts = ["the cat runs in the house", "a dog", "protein cell gene study shows high risk of cancer"]
    feats = enc.tokenize(texts, 12)
    ref = enc(feats)["embedding"]
    model = UnpaddedBert(enc.backbone, backend).eval()
    packed = pack_padded(feats)
    assert packed.cu_seqlens.tolist() == [0] + torch.cumsum(feats["attention_mask"].sum(1), 0).tolist()
    assert packed.position_ids.tolist()[: int(packed.lengths[0])] == list(range(int(packed.lengths[0])))
    got = mean_pool_packed(model(packed), packed)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # the same from id lists, and gradients flow to the backbone's weights
    ids = [row[row != enc.tokenizer.pad_token_id].tolist() for row in feats["input_ids"]]
    packed2 = pack_lists(ids)
    emb = mean_pool_packed(model(packed2), packed2)
    torch.testing.assert_close(emb, ref, rtol=1e-5, atol=1e-5)
    emb.sum().backward()
    assert enc.backbone.encoder.layer[0].attention.self.query.weight.grad is not None


def test_gpu_bench_logic_on_cpu_tiny(shared_data, tmp_path):
    """bench_gpu.py end to end on CPU with the tiny geometry: prepare, run, tables and JSON written."""
    pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "benchmarks" / "gpu" / "bench_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assets, out = tmp_path / "assets", tmp_path / "out"
    assert bench.main(["prepare", "--assets", str(assets), "--data-root", str(shared_data)]) == 0
    assert bench.main(["run", "--tiny", "--device", "cpu", "--threads", "1", "--assets", str(assets),
                       "--work", str(tmp_path / "work"), "--out", str(out), "--datasets", "snli",
                       "--steps", "1", "--warmup", "1", "--pairs", "1", "--max-rows", "40"]) == 0
    res = json.loads((out / "gpu_throughput_tiny-cpu.json").read_text())
    snli = res["datasets"]["snli"]
    assert snli["same_batches"] == "yes" and snli["errors"] == {}
    sides = {s["side"]: s for s in snli["summary"]}
    assert set(sides) == {"varlen", "sdpa_bucketed", "peer"}
    for name in ("varlen", "sdpa_bucketed"):
        ratio = sides[name]["per_pair_samples_per_s"][0] / sides["peer"]["per_pair_samples_per_s"][0]
        assert sides[name]["ratio_vs_peer"] == pytest.approx(ratio)
    # MFU formula on a hand-computed case: 6·N·T + 12·layers·d·ΣL²
    assert bench.step_flops(10, 2, 4, [3, 5]) == 6 * 10 * 8 + 12 * 2 * 4 * (9 + 25)
    assert "ours: varlen" in (out / "gpu_throughput_tiny-cpu.md").read_text()


def test_batched_varlen_attention_equals_the_per_text_loop():
    """The CPU default (one SDPA over a padded view, key padding masked) against one SDPA per text:
    outputs and the gradients of q, k and v, on uneven lengths (1 to 7 tokens)."""
    from codiemb.train.unpadded import resolve_backend, varlen_attention

    assert resolve_backend("auto", torch.device("cpu")) == "batched"
    g = torch.Generator().manual_seed(0)
    lengths = [3, 1, 7, 5]
    cu = torch.tensor([0, *torch.cumsum(torch.tensor(lengths), 0).tolist()], dtype=torch.int32)
    T, H, d = sum(lengths), 2, 4
    base = [torch.randn(T, H, d, generator=g) for _ in range(3)]
    weight = torch.randn(T, H, d, generator=g)
    results = {}
    for backend in ("reference", "batched"):
        qkv = [t.clone().requires_grad_(True) for t in base]
        out = varlen_attention(*qkv, cu, max(lengths), backend=backend)
        (out * weight).sum().backward()
        results[backend] = (out.detach(), [t.grad for t in qkv])
    torch.testing.assert_close(results["batched"][0], results["reference"][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(results["batched"][1], results["reference"][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a text of one token attends to itself only: its output is its own value vector
    torch.testing.assert_close(results["batched"][0][3], base[2][3])


def test_length_groups_split_short_from_long_and_cover_every_text():
    from codiemb.train.unpadded import length_groups

    lengths = [20, 250, 18, 240, 22, 256, 19]
    groups = length_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert {frozenset(g) for g in groups} == {frozenset({0, 2, 4, 6}), frozenset({1, 3, 5})}
    for g in groups:  # the padding bound holds in every group
        assert len(g) * max(lengths[i] for i in g) ** 2 <= 1.25 * sum(lengths[i] ** 2 for i in g)
    assert length_groups([5, 5, 5]) == [[0, 1, 2]]


def test_distill_gradient_scale_runs_on_tiny_models(load_benchmark, tiny_model_dir, shared_data, monkeypatch,
                                                    tmp_path):
    """benchmarks/distill_gradient_scale.py (how the distilled config's weights were set) on one batch
    per task: with another tiny random teacher every form reports a finite loss and a gradient; with
    the student as its own teacher the distillation forms have none (only the InfoNCE does)."""
    from tests.conftest import build_tiny_bert

    monkeypatch.setenv("CODIEMB_DATA", str(shared_data))
    teacher = build_tiny_bert(tmp_path / "teacher", hidden=48, layers=1, heads=2, seed=7)
    gs = load_benchmark("distill_gradient_scale")
    common = ["--batches", "1", "--sts-batch", "4", "--ir-batch", "4"]
    out = gs.main([str(tiny_model_dir), "--sts-teacher", str(teacher), "--ir-teacher", str(teacher)] + common)
    for task, forms in (("sts", {"cosine_mse", "kl"}), ("retrieval", {"kl", "margin_mse", "infonce"})):
        assert set(out[task]) == forms
        assert all(v["loss"] >= 0 and v["grad_norm"] > 0 and np.isfinite(v["grad_norm"]) for v in out[task].values())
    assert out["ratios"]["sts kl / cosine_mse"] == round(out["sts"]["kl"]["grad_norm"]
                                                         / out["sts"]["cosine_mse"]["grad_norm"], 2)
    same = gs.main([str(tiny_model_dir), "--sts-teacher", str(tiny_model_dir), "--ir-teacher", str(tiny_model_dir)]
                   + common)
    assert same["sts"]["cosine_mse"]["grad_norm"] < 1e-6 and same["retrieval"]["margin_mse"]["grad_norm"] < 1e-6
    assert same["retrieval"]["infonce"]["grad_norm"] > 0
