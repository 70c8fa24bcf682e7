"""Distributed dev evaluation: 2 gloo ranks give exactly the 1-rank scores, and each rank embeds only its share.

The dev set is big enough for several batches of 64 (``evaluate_dev``'s batch size) per kind of
text, with uneven slices (the last batch is short and the ranks hold different numbers of rows),
so the padding of the all-gather is exercised.
"""

from __future__ import annotations

import gc
import json
import random
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from codiemb.config import config_from_dict
from codiemb.evaluate.dev import evaluate_dev
from codiemb.model.encoder import Encoder

WORLD = 2
WORDS = ("the a of in and cat dog man woman child car house tree water fire sun moon red blue green big small "
         "runs walks eats plays sleeps reads protein cell gene cancer risk study patients effect treatment").split()


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))


def write_dev_data(root: Path, n_docs: int = 150, n_queries: int = 70, n_pairs: int = 100) -> None:
    rng = random.Random(0)
    (root / "sts").mkdir(parents=True)
    (root / "sts" / "dev.jsonl").write_text("".join(
        json.dumps({"sentence1": _sentence(rng), "sentence2": _sentence(rng), "score": rng.randint(0, 50) / 10}) + "\n"
        for _ in range(n_pairs)))
    ir = root / "ir"
    (ir / "qrels").mkdir(parents=True)
    docs = [_sentence(rng) for _ in range(n_docs)]
    docs[7] = docs[3]  # identical documents: tied scores, ordered by id
    (ir / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"d{i}", "title": "", "text": t}) + "\n"
                                             for i, t in enumerate(docs)))
    (ir / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": _sentence(rng)}) + "\n"
                                              for i in range(n_queries)))
    lines = ["query-id\tcorpus-id\tscore"]
    for q in range(n_queries):
        for d in rng.sample(range(n_docs), rng.randint(1, 3)):
            lines.append(f"q{q}\td{d}\t{rng.randint(1, 2)}")
    (ir / "qrels" / "dev.tsv").write_text("\n".join(lines) + "\n")


def dev_config(root: Path):
    return config_from_dict({
        "model": {"max_length": {"query": 16, "passage": 24, "sts": 16}},
        "data": {"root": str(root), "dev": {"sts": "sts/dev.jsonl", "retrieval": {"beir": "ir", "qrels": "dev"}}},
    })


def _worker(rank: int, init_file: str, model_dir: str, root: str, out_dir: str) -> None:
    from codiemb.train.loop import DistContext

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        enc = Encoder.load(model_dir)
        enc.train()  # as in the training loop: evaluate_dev must restore the mode
        seen = []
        real = enc.encode
        enc.encode = lambda texts, **kw: seen.append(len(texts)) or real(texts, **kw)
        res = evaluate_dev(enc, dev_config(Path(root)), DistContext(rank=rank, world_size=WORLD))
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"res": res, "texts": sum(seen),
                                                                    "training": enc.training}))
    finally:
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dev_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("devdata")
    write_dev_data(root)
    return root


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, tiny_model_dir, dev_root):
    tmp = tmp_path_factory.mktemp("devdist")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tiny_model_dir), str(dev_root), str(tmp)), nprocs=WORLD, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]


def test_two_ranks_equal_one_rank_exactly(ranks, tiny_model_dir, dev_root):
    torch.set_num_threads(1)
    enc = Encoder.load(str(tiny_model_dir))
    single = evaluate_dev(enc, dev_config(dev_root))
    assert set(single) == {"sts_spearman", "retrieval_ndcg@10", "mean"}
    for out in ranks:
        assert out["res"] == single  # the same floats, bit for bit
        assert out["training"] is True
    # each rank embedded only its share: together every STS sentence, query and document once
    n_sentences = len({s for line in (dev_root / "sts" / "dev.jsonl").read_text().splitlines()
                       for s in (json.loads(line)["sentence1"], json.loads(line)["sentence2"])})
    total = n_sentences + 70 + 150
    assert sum(o["texts"] for o in ranks) == total
    assert all(0 < o["texts"] < total for o in ranks)
