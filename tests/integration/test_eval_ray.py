"""Retrieval evaluation with the corpus embedded by Ray Data (actor pool) against the local streamed path."""

from __future__ import annotations

import json

import pytest

from codiemb.errors import DataError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def beir(tmp_path_factory, load_benchmark):
    root = tmp_path_factory.mktemp("raybeir")
    load_benchmark("eval_scale").write_beir(root, docs=300, queries=40, words=(2, 12))  # benchmarks/eval_scale.py's set
    return root


def test_ray_data_embedding_gives_the_local_scores(ray_local, tiny_model_dir, beir):
    from codiemb.data.beir import load_beir
    from codiemb.evaluate.retrieval import evaluate_retrieval
    from codiemb.model.encoder import Encoder

    enc = Encoder.load(str(tiny_model_dir))
    split = load_beir(beir, "test", corpus=False)
    local = evaluate_retrieval(enc, split, batch_size=16, doc_max_length=24, query_max_length=16)
    # the Encoder through the object store (2 actors, small tasks), or a path each actor loads
    for options in ({"num_actors": 2, "rows_per_task": 64, "use_gpu": False},
                    {"num_actors": 1, "rows_per_task": 100, "model": str(tiny_model_dir)}):
        via_ray = evaluate_retrieval(enc, split, batch_size=16, doc_max_length=24, query_max_length=16,
                                     use_ray=True, ray_options=options)
        assert via_ray["n_docs"] == local["n_docs"] == 300
        for key, value in local.items():
            if key != "seconds":
                assert via_ray[key] == pytest.approx(value, abs=1e-6), key


def test_ray_data_bad_corpus_line_names_file_and_line(ray_local, tiny_model_dir, beir, tmp_path):
    import shutil

    from codiemb.data.beir import load_beir
    from codiemb.evaluate.retrieval import evaluate_retrieval
    from codiemb.model.encoder import Encoder

    folder = tmp_path / "bad"
    shutil.copytree(beir, folder)
    with open(folder / "corpus.jsonl", "a") as fh:
        fh.write(json.dumps({"title": "no id"}) + "\n")
    with pytest.raises(DataError, match=r"corpus.jsonl:301: a corpus row needs an '_id'"):
        evaluate_retrieval(Encoder.load(str(tiny_model_dir)), load_beir(folder, "test", corpus=False), use_ray=True,
                           ray_options={"num_actors": 1})
