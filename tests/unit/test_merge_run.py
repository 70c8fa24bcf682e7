"""``codiemb merge`` on tiny models: the folder loads in sentence-transformers with the same modules
and the merged weights; incompatible models fail with one line; fast dev scoring agrees with the
full evaluators; Self Positioning builds its probe from training data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codiemb.config import config_from_dict
from codiemb.errors import UserError

WORDS = ("cat dog man woman child car house tree water fire sun moon red blue green big small good bad "
         "protein cell gene cancer risk study patients effect treatment disease model data result").split()


def tiny_bert(src: Path, dst: Path, hidden: int = 32, seed: int = 0) -> Path:
    """The ``tiny_model_dir`` fixture's vocabulary and architecture, with a tokenizer that works.

    Under transformers 5 the fixture's ``BertTokenizerFast(vocab_file=...)`` ignores the file, so its
    tokenizer (and embedding matrix) hold only the 5 special tokens and every word is [UNK]; the
    merged models would all embed every text the same way. Rebuilt here from its vocab.txt.
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    dst.mkdir(parents=True, exist_ok=True)
    words = [w for w in (Path(src) / "vocab.txt").read_text().splitlines() if w]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
    tok.save_pretrained(dst)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(words), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=hidden * 2, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(dst, safe_serialization=True)
    return dst


def _save_encoder(src: Path, dst: Path, perturb: float = 0.0, seed: int = 0) -> Path:
    from codiemb.model.encoder import Encoder

    enc = Encoder.load(str(src))
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in enc.parameters():
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    enc.save(dst)
    return dst


@pytest.fixture(scope="module")
def tiny_models(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-models")
    src = tiny_bert(tiny_model_dir, root / "hf")
    base = _save_encoder(src, root / "base")
    ir = _save_encoder(src, root / "ir", perturb=0.02, seed=1)
    sts = _save_encoder(src, root / "sts", perturb=0.02, seed=2)
    return base, ir, sts


def write_tiny_dev(root: Path, seed: int = 0) -> dict[str, str]:
    """A tiny BEIR folder (16 docs, 5 dev queries) and 12 STS pairs, from the tiny vocabulary."""
    import random

    rng = random.Random(seed)
    beir = root / "beir"
    (beir / "qrels").mkdir(parents=True, exist_ok=True)
    docs = [{"_id": f"d{i}", "title": rng.choice(WORDS), "text": " ".join(rng.choices(WORDS, k=12))} for i in range(16)]
    (beir / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    queries = [{"_id": f"q{i}", "text": " ".join(docs[i * 3]["text"].split()[:4])} for i in range(5)]
    (beir / "queries.jsonl").write_text("\n".join(json.dumps(q) for q in queries) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"q{i}\td{i * 3}\t1" for i in range(5)] + ["q0\td1\t1"]
    (beir / "qrels" / "dev.tsv").write_text("\n".join(lines) + "\n")
    sts = root / "sts_dev.jsonl"
    rows = []
    for i in range(12):
        a = rng.choices(WORDS, k=5)
        b = a[: 5 - i % 5] + rng.choices(WORDS, k=i % 5)
        rows.append({"sentence1": " ".join(a), "sentence2": " ".join(b), "score": float(5 - i % 5)})
    sts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    train_ir = root / "ir_train.jsonl"
    train_ir.write_text("\n".join(json.dumps({"query": q["text"], "positive": docs[int(q["_id"][1:]) * 3]["text"]})
                                  for q in queries) + "\n")
    return {"beir": str(beir), "sts": str(sts), "ir_train": str(train_ir)}


def _cfg(base: Path, models: list[Path], tmp_path: Path, method: str = "task_arithmetic", params=None,
         weights=None, **extra):
    weights = weights or [1.0] * len(models)
    tree = {"run": {"name": "t", "seed": 0}, "model": {"name": str(base)}, "storage": {"path": str(tmp_path / "runs")},
            "tracking": {"enabled": False},
            "merge": {"method": method, "models": [{"model": str(m), "weight": w} for m, w in zip(models, weights)],
                      "parameters": params or {}, "output": str(tmp_path / "merged")}}
    tree.update(extra)
    return config_from_dict(tree)


def test_merge_writes_sentence_transformers_folder_with_merged_weights(tiny_models, tmp_path):
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer

    from codiemb.merge.run import REPORT_FILE, run_merge

    base, ir, sts = tiny_models
    cfg = _cfg(base, [ir, sts], tmp_path, params={"lam": 0.8}, weights=[0.3, 0.7])
    result = run_merge(cfg)
    out = Path(result.output_dir)

    # the merged weights are θ0 + λ Σ w_k (θk − θ0), checked on the saved file
    b, a, s, m = (load_file(str(p / "model.safetensors")) for p in (base, ir, sts, out))
    key = "encoder.layer.0.attention.self.query.weight"
    expected = b[key] + 0.8 * (0.3 * (a[key] - b[key]) + 0.7 * (s[key] - b[key]))
    torch.testing.assert_close(m[key], expected, rtol=0, atol=1e-6)
    assert not torch.equal(m[key], b[key])

    # the pooling and normalize modules survive, and ST gives the same embeddings as our encoder
    st_base, st_out = SentenceTransformer(str(base), device="cpu"), SentenceTransformer(str(out), device="cpu")
    assert [type(mod).__name__ for mod in st_out] == [type(mod).__name__ for mod in st_base] == \
        ["Transformer", "Pooling", "Normalize"]
    assert st_out[1].get_config_dict()["pooling_mode"] == st_base[1].get_config_dict()["pooling_mode"] == "mean"
    from codiemb.model.encoder import Encoder

    texts = ["the cat sleeps", "protein cell study shows risk"]
    ours = Encoder.load(str(out)).encode(texts)
    theirs = torch.as_tensor(st_out.encode(texts))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert torch.allclose(theirs.norm(dim=1), torch.ones(2), atol=1e-5)

    report = json.loads((out / REPORT_FILE).read_text())
    assert report["method"] == "task_arithmetic" and report["parameters"] == {"lam": 0.8}
    assert report["weights"] == [0.3, 0.7]
    assert [i["model"] for i in report["inputs"]] == [str(ir), str(sts)]
    assert len(report["inputs"][0]["sha256"]) == 64


def test_mismatched_shapes_fail_with_one_line_naming_the_tensor(tiny_models, tiny_model_dir, tmp_path):
    from codiemb.merge.run import run_merge

    base, ir, _ = tiny_models
    wide = tiny_bert(tiny_model_dir, tmp_path / "wide", hidden=48)
    cfg = _cfg(base, [ir, wide], tmp_path)
    with pytest.raises(UserError) as exc:
        run_merge(cfg)
    msg = str(exc.value)
    assert "\n" not in msg
    assert f"model '{wide}'" in msg and "tensor 'backbone.embeddings.word_embeddings.weight'" in msg
    assert "(vocab" not in msg and "shape (" in msg and ", 48)" in msg and ", 32)" in msg


def test_unknown_method_is_a_config_error(tiny_models, tmp_path):
    from codiemb.errors import ConfigError
    from codiemb.merge.run import run_merge

    base, ir, sts = tiny_models
    with pytest.raises(ConfigError, match="merge.method 'nope' is unknown"):
        run_merge(_cfg(base, [ir, sts], tmp_path, method="nope"))


def test_dev_scores_match_the_full_evaluators(tiny_models, tmp_path):
    """With a pool that holds the whole tiny corpus and every STS pair, the fast scorer must give
    exactly what evaluate_sts / evaluate_retrieval give on the saved model."""
    from codiemb.data.beir import load_beir
    from codiemb.evaluate.retrieval import evaluate_retrieval
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.merge.run import run_merge
    from codiemb.model.encoder import Encoder

    base, ir, sts = tiny_models
    data = write_tiny_dev(tmp_path)
    cfg = _cfg(base, [ir, sts], tmp_path, method="delta_guided", params={"gamma": 1.0},
               data={"dev": {"sts": data["sts"], "retrieval": {"beir": data["beir"], "qrels": "dev"}}},
               tune={"dev": {"bm25_candidates": 16, "dense_candidates": 16, "cache_dir": str(tmp_path / "cache")}})
    result = run_merge(cfg, evaluate=True)
    dev = result.report["dev"]
    assert dev["pool"]["pool_docs"] == 16 and dev["pool"]["sts_pairs"] == 12
    enc = Encoder.load(result.output_dir)
    ml = cfg.model.max_length
    ref_sts = evaluate_sts(enc, data["sts"], max_length=ml.sts)["spearman"]
    ref_ir = evaluate_retrieval(enc, load_beir(data["beir"], "dev"), query_max_length=ml.query,
                                doc_max_length=ml.passage)["ndcg@10"]
    assert dev["sts_spearman"] == pytest.approx(ref_sts, abs=1e-3)
    assert dev["retrieval_ndcg_at_10"] == pytest.approx(ref_ir, abs=1e-3)
    assert list((tmp_path / "cache").glob("pool-*.json"))  # the mined pool is cached


def test_pool_is_relevant_plus_bm25_plus_dense_candidates(tiny_models, tmp_path):
    from codiemb.data.beir import load_beir
    from codiemb.merge.evaluate_merge import bm25_topk, build_dev_set, mine_dense
    from codiemb.model.encoder import Encoder

    base, _, _ = tiny_models
    data = write_tiny_dev(tmp_path)
    enc = Encoder.load(str(base))
    dev = build_dev_set(enc, beir_folder=data["beir"], bm25_candidates=2, dense_candidates=1, mine_max_length=64)
    split = load_beir(data["beir"], "dev")
    expected = {d for q in split.qrels for d in split.qrels[q]}
    for ranked in bm25_topk(split.corpus, split.queries, 2).values():
        expected |= set(ranked)
    for ranked in mine_dense(enc, None, split.corpus, split.queries, 1, 64, 64).values():
        expected |= set(ranked)
    assert set(dev.doc_ids) == expected
    assert len(dev.doc_ids) < 16


def test_bm25_prefers_documents_sharing_rare_terms():
    from codiemb.merge.evaluate_merge import bm25_topk

    corpus = {"a": "the cat the cat", "b": "the dog", "c": "protein cell gene", "d": "the the the"}
    got = bm25_topk(corpus, {"q1": "cat", "q2": "gene protein", "q3": "the dog"}, 2)
    assert got["q1"][0] == "a" and got["q2"][0] == "c" and got["q3"][0] == "b"
    assert len(got["q1"]) == 1  # only one document contains 'cat'


def test_self_positioning_builds_a_training_probe_and_learns(tiny_models, tmp_path):
    from codiemb.merge.run import run_merge

    base, ir, sts = tiny_models
    data = write_tiny_dev(tmp_path)
    datasets = [{"name": "ir", "task": "retrieval", "path": data["ir_train"], "batch_size": 2},
                {"name": "sts", "task": "sts", "path": data["sts"], "score_range": [0, 5], "batch_size": 4}]
    cfg = _cfg(base, [ir, sts], tmp_path, method="self_positioning", params={"steps": 5, "lr": 0.1, "mu": 0.01},
               data={"datasets": datasets})
    cfg.merge.probe_size = 4
    result = run_merge(cfg)
    rep = result.report
    assert rep["probe"] == {"ir": 4, "sts": 4}
    assert len(rep["learned"]["coefficients"]) == 2
    assert rep["learned"]["probe_loss"] <= rep["learned"]["probe_loss_start"] + 1e-9
    assert (Path(result.output_dir) / "modules.json").is_file()
