"""Decoder LLM embedders (issue 15 item 3): tiny random Llama / Qwen2 / Qwen3 (no download).

* the tokenizer (no pad token of its own) gets one, EOS is appended for last-token pooling and
  survives truncation, padding is on the right; the token shards hold exactly those ids;
* ``model.bidirectional``: token 0's state depends on later tokens only when it is on;
* instructions for queries, passages and STS sentences: the shards' pool starts are
  ``Encoder.tokenize``'s, the saved folder carries them as sentence-transformers prompts, and
  ``SentenceTransformer(path)`` embeds like codiemb (1e-5), causal and bidirectional;
* the training loop trains a decoder (padded forward, the unpadded one refused) and saves a folder
  that both load alike; evaluation uses the saved instructions.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from codiemb.model.encoder import Encoder

FAMILIES = ("llama", "qwen2", "qwen3")
QUERY = "Instruct: retrieve documents that support the claim\nQuery: "
PASSAGE = "Passage: "
STS = "Instruct: retrieve similar sentence\nQuery: "
TEXTS = ["the cat", "a dog runs in the house with a red car and the sun is high", "protein",
         "Cancer risk study: patients found a high effect of the treatment on the disease."]


@pytest.fixture(scope="module")
def tiny_decoder(load_benchmark):
    return load_benchmark("tiny_decoder")


@pytest.fixture(scope="module", params=FAMILIES)
def decoder_dir(request, tiny_decoder, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tiny_decoder.build(folder, request.param)
    return folder


def _load(folder, **kw) -> Encoder:
    kw.setdefault("pooling", "last_token")
    return Encoder.load(str(folder), **kw)


def test_tokenizer_gets_pad_eos_and_right_padding(decoder_dir):
    from transformers import AutoTokenizer

    raw = AutoTokenizer.from_pretrained(str(decoder_dir))
    assert raw.pad_token is None and raw("the cat")["input_ids"][-1] != raw.eos_token_id  # what we start from
    enc = _load(decoder_dir)
    tok = enc.tokenizer
    assert enc.is_decoder and tok.pad_token == tok.eos_token and tok.padding_side == "right"
    feats = enc.tokenize(TEXTS, max_length=8)
    ids, mask = feats["input_ids"], feats["attention_mask"]
    lengths = mask.sum(dim=1)
    assert int(lengths.min()) < 8 == int(lengths.max())  # padding and truncation both happen
    last = ids[torch.arange(len(TEXTS)), lengths - 1]
    assert (last == tok.eos_token_id).all()  # EOS is the last real token, also after truncation
    assert bool(mask[:, 0].all())  # right padding
    # mean pooling leaves the tokenizer's post-processor alone
    assert Encoder.load(str(decoder_dir), pooling="mean").tokenizer("the cat")["input_ids"][-1] != tok.eos_token_id


def test_bidirectional_makes_token_zero_see_later_tokens(decoder_dir):
    a, b = "the cat eats", "the dog runs fast"
    for bidirectional in (False, True):
        enc = _load(decoder_dir, bidirectional=bidirectional).eval()
        first = []
        for text in (a, b):
            with torch.no_grad():
                out = enc.backbone(**enc.tokenize([text]))  # one text: no padding, no mask to hide behind
            first.append(out.last_hidden_state[0, 0])
        ids_a, ids_b = (enc.tokenize([t])["input_ids"][0, 0] for t in (a, b))
        assert ids_a == ids_b  # same first token
        differs = not torch.allclose(first[0], first[1], atol=1e-6)
        assert differs == bidirectional, f"bidirectional={bidirectional}"


def test_bidirectional_on_an_encoder_is_a_no_op_and_off_is_refused(tiny_model_dir):
    from codiemb.errors import ModelError

    assert not Encoder.load(str(tiny_model_dir), bidirectional=True).is_decoder
    with pytest.raises(ModelError, match="encoder, not a causal decoder"):
        Encoder.load(str(tiny_model_dir), bidirectional=False)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["causal", "bidirectional"])
def test_saved_folder_embeds_the_same_under_sentence_transformers(decoder_dir, tmp_path, bidirectional):
    from sentence_transformers import SentenceTransformer

    enc = _load(decoder_dir, bidirectional=bidirectional, instructions={"query": QUERY, "passage": PASSAGE, "sts": STS})
    out = enc.save(tmp_path / "st")
    cfg = json.loads((out / "config_sentence_transformers.json").read_text())
    assert cfg["prompts"] == {"query": QUERY, "document": PASSAGE, "sts": STS}
    assert json.loads((out / "config.json").read_text()).get("is_causal", True) is (not bidirectional)
    st = SentenceTransformer(str(out), device="cpu")
    again = Encoder.load(str(out))  # the folder's own pooling, prompts and attention
    assert again.pooling == "last_token" and again.instructions == enc.instructions
    assert getattr(again.backbone.config, "is_causal", True) is (not bidirectional)
    for name, kind in (("query", "query"), ("document", "passage"), ("sts", "sts"), (None, None)):
        ours = again.encode(TEXTS, instruction=again.instructions.get(kind), batch_size=4, convert_to_numpy=True)
        theirs = st.encode(TEXTS, prompt_name=name, batch_size=4)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5, err_msg=str(name))
    plain = again.encode(TEXTS, convert_to_numpy=True)
    assert np.abs(plain - again.encode(TEXTS, instruction=QUERY, convert_to_numpy=True)).max() > 1e-3  # it matters
    np.testing.assert_allclose(st.encode_query(TEXTS), again.encode(TEXTS, instruction=QUERY, convert_to_numpy=True),
                               atol=1e-5)


def test_shards_hold_the_encoders_ids_and_pool_starts(decoder_dir):
    from codiemb.data.shards import ShardStore
    from codiemb.data.tokenize import load_tokenizer

    enc = _load(decoder_dir)
    tok = load_tokenizer(str(decoder_dir), pooling="last_token")
    rows = [{"query": TEXTS[0], "positives": [TEXTS[1]], "negatives": [TEXTS[2]], "instruction": None,
             "passage_instruction": None},
            {"query": TEXTS[3], "positives": [TEXTS[2]], "negatives": [], "instruction": "Claim: ",
             "passage_instruction": "Evidence: "}]
    lengths = {"query": 32, "passage": 12}  # the passages are truncated (EOS kept)
    store = ShardStore.from_records(tok, "retrieval", rows, lengths, instruction={"query": QUERY, "passage": PASSAGE})
    assert store.pad_id == enc.tokenizer.pad_token_id
    for i, r in enumerate(rows):
        q_ins = r["instruction"] or QUERY
        p_ins = r["passage_instruction"] or PASSAGE
        texts = [(r["query"], q_ins, lengths["query"])] + [(p, p_ins, lengths["passage"])
                                                           for p in r["positives"] + r["negatives"]]
        for got, start, (text, ins, limit) in zip(store.texts(i), store.pool_starts(i), texts):
            feats = enc.tokenize([text], limit, instruction=ins)
            assert got.tolist() == feats["input_ids"][0].tolist()
            assert got[-1] == enc.tokenizer.eos_token_id
            assert start == int(feats["pool_mask"][0].argmax()) > 0  # first pooled position, after the prefix
    sts = ShardStore.from_records(tok, "sts", [{"sentence1": TEXTS[0], "sentence2": TEXTS[1], "score": 1.0},
                                               {"sentence1": TEXTS[2], "sentence2": TEXTS[3], "score": 2.0,
                                                "instruction": "Same: "}],
                                  {"sts": 16}, instruction={"sts": STS})
    assert sts.stats["with_instruction"] == 4
    s1, _, _ = sts.sts_row(1)
    assert s1.tolist() == enc.tokenize([TEXTS[2]], 16, instruction="Same: ")["input_ids"][0].tolist()


def _write_rows(tmp_path):
    import random

    words = "the a cat dog man woman child car house tree water fire sun moon red blue green big small".split()
    rng = random.Random(0)
    sts, ret = tmp_path / "sts.jsonl", tmp_path / "ret.jsonl"
    with open(sts, "w") as fh:
        for _ in range(32):
            fh.write(json.dumps({"sentence1": " ".join(rng.sample(words, 4)), "sentence2": " ".join(rng.sample(words, 4)),
                                 "score": round(rng.uniform(0, 5), 1)}) + "\n")
    with open(ret, "w") as fh:
        for i in range(32):
            q = " ".join(rng.sample(words, 3))
            row = {"query": q, "positive": q + " " + rng.choice(words), "negatives": [" ".join(rng.sample(words, 4))]}
            if i % 4 == 0:
                row["passage_instruction"] = "Evidence: "  # a row's own wins over the model's
            fh.write(json.dumps(row) + "\n")
    return sts, ret


@pytest.mark.parametrize("pooling", ["last_token", "mean"])
def test_loop_trains_a_decoder_and_saves_what_sentence_transformers_loads(tmp_path, tiny_decoder, pooling):
    from sentence_transformers import SentenceTransformer

    from codiemb.config import config_from_dict
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.train.loop import train

    folder = tmp_path / "qwen3"
    tiny_decoder.build(folder, "qwen3")
    sts, ret = _write_rows(tmp_path)
    cfg = config_from_dict({
        "run": {"name": "dec", "seed": 1},
        "model": {"name": str(folder), "pooling": pooling, "bidirectional": pooling == "mean",
                  "max_length": {"query": 24, "passage": 24, "sts": 24},
                  "instructions": {"query": QUERY, "passage": PASSAGE, "sts": STS}},
        "data": {"datasets": [{"name": "sts", "task": "sts", "path": str(sts), "score_range": [0, 5], "batch_size": 8},
                              {"name": "ret", "task": "retrieval", "path": str(ret), "batch_size": 8}],
                 "shards": str(tmp_path / "shards")},
        "loss": {"retrieval": {"temperature": 0.05, "negatives": 1}},
        "train": {"max_steps": 6, "lr": 1e-3, "log_every": 1, "checkpoint_every": 0, "retrieval_forward": "auto"},
        "tracking": {"enabled": False},
    })
    res = train(cfg, output_dir=tmp_path / "out")
    assert res.steps == 6 and res.steps_per_task["ret"] > 0 and res.steps_per_task["sts"] > 0
    losses = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(v) for m in losses for k, v in m.items() if k.startswith("loss/"))
    before, after = _load(folder, pooling=pooling), Encoder.load(res.model_dir)
    assert after.pooling == pooling and after.instructions == {"query": QUERY, "passage": PASSAGE, "sts": STS}
    assert not np.allclose(before.encode(TEXTS, convert_to_numpy=True), after.encode(TEXTS, convert_to_numpy=True))
    st = SentenceTransformer(res.model_dir, device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS), after.encode(TEXTS, convert_to_numpy=True), atol=1e-5)
    # with prompts: last-token pooling. (Mean pooling leaves the prompt out by ST's count of the
    # prompt's tokens alone; byte-level BPE glues the prompt's trailing space to the first word, so
    # that count is one more than codiemb's, which finds the boundary by character offsets.)
    for name, kind in (("query", "query"), ("document", "passage"), ("sts", "sts")) if pooling == "last_token" else ():
        ours = after.encode(TEXTS, instruction=after.instructions[kind], convert_to_numpy=True)
        np.testing.assert_allclose(st.encode(TEXTS, prompt_name=name), ours, atol=1e-5, err_msg=name)
    # evaluation reads the saved instructions: the same as passing them, not the same as none
    pairs = [{"sentence1": a, "sentence2": b, "score": float(i % 5)} for i, (a, b) in
             enumerate(zip(TEXTS * 2, TEXTS[1:] * 2 + TEXTS[:1]))]
    plain = Encoder.load(res.model_dir, instructions={})
    plain.instructions = {}
    saved, passed, none = (evaluate_sts(after, pairs), evaluate_sts(plain, pairs, instruction=STS),
                           evaluate_sts(plain, pairs))
    assert saved["pearson"] == pytest.approx(passed["pearson"], abs=1e-4)
    assert abs(saved["pearson"] - none["pearson"]) > 1e-3
