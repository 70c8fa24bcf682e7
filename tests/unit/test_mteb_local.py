"""MTEB tasks run through the ``mteb`` library with the codiemb wrapper give the project's own scores.

Two tiny tasks written in mteb's own task format (``AbsTaskSTS`` / ``AbsTaskRetrieval`` subclasses
with a ``TaskMetadata``, data built in ``load_data``), scored by ``mteb.evaluate`` through
``CodiembMtebEncoder`` and by ``evaluate/sts.py`` / ``evaluate/retrieval.py`` on the same rows, on
the tiny random BERT. Equal to 1e-4 on several metrics, with and without instructions (which change
the scores, so the equality is not a constant; retrieval to mteb's own rounding, 5 decimals), and
the standard tasks' local-data path
(STSBenchmark, SciFact from a data folder) the same way. Offline: the hub is never asked.
"""

from __future__ import annotations

import json

import pytest

mteb = pytest.importorskip("mteb")

from datasets import Dataset, DatasetDict  # noqa: E402  (mteb brings datasets)
from mteb.abstasks.retrieval import AbsTaskRetrieval  # noqa: E402
from mteb.abstasks.sts import AbsTaskSTS  # noqa: E402
from mteb.abstasks.task_metadata import TaskMetadata  # noqa: E402

from codiemb.errors import UserError  # noqa: E402
from codiemb.evaluate import mteb_tasks  # noqa: E402
from codiemb.evaluate.mteb_tasks import CodiembMtebEncoder, load_task, run_mteb, run_tasks  # noqa: E402
from codiemb.evaluate.retrieval import evaluate_retrieval  # noqa: E402
from codiemb.evaluate.sts import evaluate_sts  # noqa: E402

TOL = 1e-4  # score points (x100): STS correlations come back from mteb unrounded
RETRIEVAL_TOL = 5e-4 + 1e-7  # mteb rounds retrieval metrics to 5 decimals of a fraction: half a unit, x100

_META = dict(
    description="A tiny local task for codiemb's tests.", reference="https://github.com/embeddings-benchmark/mteb",
    dataset={"path": "codiemb/none", "revision": "local"}, category="t2t", modalities=["text"],
    eval_splits=["test"], eval_langs=["eng-Latn"], date=("2024-01-01", "2024-01-01"), domains=[],
    task_subtypes=[], license="cc-by-4.0", annotations_creators="derived", dialect=[], sample_creation="found",
    bibtex_citation="",
)

STS_ROWS = [
    ("the cat sleeps on the house", "a cat sleeps in the house", 4.8),
    ("the dog runs to the tree", "a dog walks by the tree", 3.6),
    ("the man reads a study", "the woman writes a study", 2.2),
    ("red sun and blue moon", "the moon is blue", 2.9),
    ("the child plays with water", "fire is hot and red", 0.3),
    ("patients found the treatment good", "the treatment shows good effect in patients", 4.1),
    ("the gene increases cancer risk", "cancer risk is high with the gene", 4.4),
    ("a big green car", "a small red car", 1.7),
    ("the model data is bad", "good result of the study", 0.9),
    ("the woman eats", "the woman sleeps", 1.2),
]

QUERIES = {"q1": "cancer risk of the gene", "q2": "the dog runs", "q3": "treatment effect in patients",
           "q4": "blue moon and red sun"}
CORPUS = {  # id -> (title, text)
    "d1": ("gene study", "the gene increases the risk of cancer"),
    "d2": ("", "a dog runs and plays in the water"),
    "d3": ("treatment", "the treatment shows a good effect in patients"),
    "d4": ("moon", "the moon is blue and the sun is red"),
    "d5": ("cats", "the cat sleeps on the house"),
    "d6": ("", "a woman reads and writes"),
    "d7": ("disease", "the disease decreases with treatment"),
    "d8": ("cars", "a big car and a small car"),
    "d9": ("", "fire and water"),
    "d10": ("data", "the model found low data results"),
    "d11": ("trees", "the tree is green and big"),
    "d12": ("protein", "protein in the cell is high"),
}
QRELS = {"q1": {"d1": 1, "d12": 1}, "q2": {"d2": 1}, "q3": {"d3": 2, "d7": 1}, "q4": {"d4": 1}}


class TinySTS(AbsTaskSTS):
    min_score = 0
    max_score = 5
    metadata = TaskMetadata(name="CodiembTinySTS", type="STS", main_score="cosine_spearman", **_META)

    def load_data(self, num_proc=None, **kwargs) -> None:
        self.dataset = DatasetDict({"test": Dataset.from_dict({
            "sentence1": [a for a, _, _ in STS_ROWS], "sentence2": [b for _, b, _ in STS_ROWS],
            "score": [s for _, _, s in STS_ROWS]})})
        self.data_loaded = True


class TinyRetrieval(AbsTaskRetrieval):
    metadata = TaskMetadata(name="CodiembTinyRetrieval", type="Retrieval", main_score="ndcg_at_10", **_META)

    def load_data(self, num_proc=None, **kwargs) -> None:
        split = {"corpus": Dataset.from_list([{"id": d, "title": t, "text": x} for d, (t, x) in CORPUS.items()]),
                 "queries": Dataset.from_list([{"id": q, "text": t} for q, t in QUERIES.items()]),
                 "relevant_docs": QRELS, "top_ranked": None}
        self.dataset = {"default": {"test": split}}
        self.data_loaded = True


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    from codiemb.model.encoder import Encoder

    return Encoder.load(str(tiny_model_dir), device="cpu")


def _sts_records():
    return [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_ROWS]


def _write_beir(folder):
    (folder / "qrels").mkdir(parents=True)
    with open(folder / "corpus.jsonl", "w") as fh:
        for d, (t, x) in CORPUS.items():
            fh.write(json.dumps({"_id": d, "title": t, "text": x}) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for q, t in QUERIES.items():
            fh.write(json.dumps({"_id": q, "text": t}) + "\n")
    lines = ["query-id\tcorpus-id\tscore"] + [f"{q}\t{d}\t{s}" for q, docs in QRELS.items() for d, s in docs.items()]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def _ours_retrieval(encoder, folder, **kw):
    from codiemb.data.beir import load_beir

    return evaluate_retrieval(encoder, load_beir(folder, "test", corpus=False), k_values=(1, 3, 5, 10, 100),
                              index="torch", **kw)


def _mteb_scores(wrapper, task):
    (result,) = run_tasks(wrapper, [task], batch_size=4)
    (scores,) = result.scores["test"]
    return scores


def _check_retrieval(theirs: dict, ours: dict):
    """mteb rounds its retrieval metrics to 5 decimals (``_evaluators/retrieval_metrics.py``): ours,
    a fraction, must round to the same value (off by at most half a unit of the 5th decimal)."""
    for mteb_key, our_key in [("ndcg_at_10", "ndcg@10"), ("ndcg_at_1", "ndcg@1"), ("ndcg_at_3", "ndcg@3"),
                              ("mrr_at_10", "mrr@10"), ("recall_at_3", "recall@3"), ("recall_at_5", "recall@5"),
                              ("ndcg_at_100", "ndcg@100")]:
        assert abs(theirs[mteb_key] - ours[our_key] / 100) <= 5e-6 + 1e-9, (mteb_key, theirs[mteb_key], ours[our_key])


def test_sts_task_equals_project_evaluator(encoder):
    wrapper = CodiembMtebEncoder(encoder, "tiny")
    scores = _mteb_scores(wrapper, TinySTS())
    ours = evaluate_sts(encoder, _sts_records(), batch_size=4)
    assert 100 * scores["cosine_spearman"] == pytest.approx(ours["spearman"], abs=TOL)
    assert 100 * scores["cosine_pearson"] == pytest.approx(ours["pearson"], abs=TOL)
    assert scores["main_score"] == scores["cosine_spearman"]
    assert abs(ours["spearman"]) > 1.0  # a real correlation, not a degenerate 0
    # mteb asked for symmetric embeddings (no prompt type): the wrapper used the sts kind for both columns
    assert [(c[1], c[2], c[4]) for c in wrapper.calls] == [(None, "sts", len(STS_ROWS))] * 2


def test_sts_instruction_is_passed_through(encoder):
    plain = evaluate_sts(encoder, _sts_records(), batch_size=4)["spearman"]
    ours = evaluate_sts(encoder, _sts_records(), batch_size=4, instruction="the study of ")["spearman"]
    assert abs(ours - plain) > 1e-2  # the instruction changes the embeddings, so equality below means something
    wrapper = CodiembMtebEncoder(encoder, "tiny", prompts={"STS": "the study of "})
    scores = _mteb_scores(wrapper, TinySTS())
    assert 100 * scores["cosine_spearman"] == pytest.approx(ours, abs=TOL)
    # the model's own sts instruction is the default (no prompts given)
    encoder.instructions = {"sts": "the study of "}
    try:
        own = _mteb_scores(CodiembMtebEncoder(encoder, "tiny"), TinySTS())
    finally:
        encoder.instructions = {}
    assert 100 * own["cosine_spearman"] == pytest.approx(ours, abs=TOL)


def test_retrieval_task_equals_project_evaluator(encoder, tmp_path):
    wrapper = CodiembMtebEncoder(encoder, "tiny")
    scores = _mteb_scores(wrapper, TinyRetrieval())
    ours = _ours_retrieval(encoder, _write_beir(tmp_path / "beir"))
    _check_retrieval(scores, ours)
    assert 0.0 < ours["ndcg@10"] < 100.0 and ours["ndcg@1"] < 100.0  # neither empty nor trivially perfect
    assert scores["main_score"] == scores["ndcg_at_10"]
    kinds = {(c[1], c[2]) for c in wrapper.calls}
    assert kinds == {("query", "query"), ("document", "passage")}


def test_retrieval_query_and_passage_instructions(encoder, tmp_path):
    folder = _write_beir(tmp_path / "beir")
    plain = _ours_retrieval(encoder, folder)
    encoder.instructions = {"query": "the study of ", "passage": "a result "}
    try:
        ours = _ours_retrieval(encoder, folder)  # evaluate_retrieval reads the model's own instructions
        wrapper = CodiembMtebEncoder(encoder, "tiny")
        scores = _mteb_scores(wrapper, TinyRetrieval())
    finally:
        encoder.instructions = {}
    assert any(abs(ours[k] - plain[k]) > 1e-2 for k in ("ndcg@10", "mrr@10", "ndcg@3"))
    _check_retrieval(scores, ours)
    used = {c[1]: c[3] for c in wrapper.calls}
    assert used == {"query": "the study of ", "document": "a result "}
    # mteb's precedence: a task-and-type key beats the model's own instruction
    wrapper = CodiembMtebEncoder(encoder, "tiny", prompts={"CodiembTinyRetrieval-query": "the study of "})
    assert wrapper.instruction_for(TinyRetrieval.metadata, mteb.types.PromptType.query) == ("query", "the study of ")
    assert wrapper.instruction_for(TinyRetrieval.metadata, mteb.types.PromptType.document) == ("passage", None)


def _offline_miss(monkeypatch, cls, seen: list | None = None) -> list:
    """Make a standard task's hub/cache load fail as it does with an empty cache; ``seen`` collects
    the hub-offline flags each attempt ran under."""
    import datasets.config
    import huggingface_hub.constants

    seen = [] if seen is None else seen

    def load_data(self, *a, **k):
        seen.append((huggingface_hub.constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE))
        raise ConnectionError(f"Couldn't reach '{self.metadata.dataset['path']}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(cls, "load_data", load_data)
    monkeypatch.delenv("CODIEMB_ALLOW_DOWNLOAD", raising=False)
    return seen


def test_standard_tasks_read_the_data_folder(encoder, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from mteb.tasks.retrieval.eng.sci_fact_retrieval import SciFact
    from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

    from codiemb.cli import main

    seen = _offline_miss(monkeypatch, SciFact, _offline_miss(monkeypatch, STSBenchmarkSTS))
    data = tmp_path / "data"
    (data / "sts" / "stsb").mkdir(parents=True)
    with open(data / "sts" / "stsb" / "test.jsonl", "w") as fh:
        for r in _sts_records():
            fh.write(json.dumps(r) + "\n")
    _write_beir(data / "ir" / "scifact")

    task, source = load_task("STSBenchmark", data)
    assert source == str(data / "sts" / "stsb") and task.metadata.main_score == "cosine_spearman"
    assert len(task.dataset["test"]) == len(STS_ROWS)

    assert main(["evaluate", str(tiny_model_dir), "--mteb", "STSBenchmark", "SciFact", "--data-dir", str(data),
                 "--batch-size", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    res = out["results"]
    assert res["STSBenchmark"]["main_metric"] == "cosine_spearman" and res["SciFact"]["main_metric"] == "ndcg_at_10"
    ours_sts = evaluate_sts(encoder, data / "sts" / "stsb" / "test.jsonl", batch_size=4)
    assert res["STSBenchmark"]["main_score"] == pytest.approx(ours_sts["spearman"], abs=TOL)
    ours_ir = _ours_retrieval(encoder, data / "ir" / "scifact")
    assert res["SciFact"]["main_score"] == pytest.approx(ours_ir["ndcg@10"], abs=RETRIEVAL_TOL)
    assert res["SciFact"]["splits"]["test"]["mrr_at_10"] == pytest.approx(ours_ir["mrr@10"], abs=RETRIEVAL_TOL)
    assert len(seen) == 3 and all(flags == (True, True) for flags in seen)  # the cache was tried, hub off


def test_mteb_data_maps_any_task_to_local_files(encoder, tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in _sts_records()))
    out = run_mteb(encoder, ["STS12"], local_data={"STS12": str(f)}, batch_size=4)
    assert out["results"]["STS12"]["data"] == str(f)
    assert out["summary"]["STS12"] == pytest.approx(evaluate_sts(encoder, f, batch_size=4)["spearman"], abs=TOL)


def test_absent_data_is_one_line_saying_what_to_fetch(tmp_path, monkeypatch):
    from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

    _offline_miss(monkeypatch, STSBenchmarkSTS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_task("STSBenchmark", tmp_path / "empty")
    msg = str(err.value)
    assert "\n" not in msg
    assert "mteb/stsbenchmark-sts" in msg and "sts/stsb" in msg and "codiemb data fetch-mteb STSBenchmark" in msg
    with pytest.raises(UserError, match="unknown MTEB task"):
        load_task("NoSuchTask", tmp_path / "empty")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"sentence1": "a", "sentence2": "b", "score": 7.0}) + "\n"
                   + json.dumps({"sentence1": "c", "sentence2": "d", "score": 1.0}) + "\n")
    with pytest.raises(UserError, match="outside MTEB task 'STSBenchmark'"):
        load_task("STSBenchmark", tmp_path, local_path=bad)


def test_only_the_fetch_command_uses_the_hub(monkeypatch, capsys):
    """load_task keeps the hub off even with the old CODIEMB_ALLOW_DOWNLOAD switch set; the explicit
    `codiemb data fetch-mteb` is refused in one line under HF_HUB_OFFLINE / HF_DATASETS_OFFLINE."""
    from mteb.tasks.sts.eng.sts_benchmark_sts import STSBenchmarkSTS

    from codiemb.cli import main

    seen = _offline_miss(monkeypatch, STSBenchmarkSTS)
    monkeypatch.setenv("CODIEMB_ALLOW_DOWNLOAD", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(UserError):
        load_task("STSBenchmark", "/nonexistent-data-folder")
    assert seen == [(True, True)]  # the one load attempt ran with the hub switched off
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(var, "1")
        assert main(["data", "fetch-mteb", "STSBenchmark"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"codiemb: error: cannot fetch MTEB task 'STSBenchmark': {var}=1 forbids the hub"
        monkeypatch.delenv(var)
    assert not hasattr(mteb_tasks, "downloads_allowed")