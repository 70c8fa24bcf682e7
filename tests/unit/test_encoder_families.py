"""Every encoder family: the padded retrieval forward equals an unpadded one (loss and gradients).

Issue 15 item 2. Tiny random models (2 layers x 32, dropout 0, built here, no download) of
BERT, MPNet (relative position bias; positions start after the padding index), RoBERTa and
XLM-R (positions offset by the padding index). For each family and pooling (mean, CLS, last
token, and mean with an instruction prefix left out of the pooling):

* the padded batch (``Encoder.tokenize`` + the Hugging Face forward, texts of 1..~40 words,
  some truncated) gives the same InfoNCE loss and parameter gradients (rtol 1e-5) as embedding
  every text ALONE, a batch of one with no padding at all: padding never leaks into the result;
* where the packed forward of ``codiemb.train.unpadded`` accepts the backbone
  (``unsupported_reason`` is None: BERT today), it gives the same loss and gradients too; where
  it does not, the loop's ``auto`` choice is the padded forward (refused, never silently wrong).

RoBERTa and XLM-R use the MPNet-style WordPiece tokenizer built here (``<s> … </s>``, ``<pad>`` =
1): the tokenizer kind is not what this checks; the models' position-id rule is.

Decoders (issue 15 item 3): Llama, Qwen2 and Qwen3 from ``benchmarks/tiny_decoder.py`` (byte-level
BPE, no pad token of its own: the encoder pads with EOS, on the right), causal and, for Qwen3,
bidirectional (``config.is_causal = False``): the padded forward is exact for them too (rotary
positions start at 0 for every text under right padding), and the loop takes it. They run in
float64 (see ``_decoder``).
"""

from __future__ import annotations

import random

import pytest
import torch

from codiemb.config import config_from_dict
from codiemb.losses.ir import info_nce
from codiemb.model.encoder import Encoder
from codiemb.train.loop import TaskData, retrieval_forward
from codiemb.train.unpadded import UnpaddedBert, mean_pool_packed, pack_padded, unsupported_reason

WORDS = ("the a of to in and is cat dog man woman child car house tree water fire sun moon red blue "
         "green big small runs walks eats protein cell gene cancer study patients effect").split()
CHARS = list("abcdefghijklmnopqrstuvwxyz")
M, N = 2, 1  # positives, negatives per query
INIT = 0.2  # initializer_range: at HF's 0.02 a tiny random model embeds every text alike (CLS: loss = log 8)
B = 4
MAX_LEN = {"query": 12, "passage": 24}
INSTRUCTION = "Represent the query for retrieval: "


def _vocab(specials: list[str]) -> list[str]:
    return list(dict.fromkeys(specials + sorted(set(WORDS)) + ["represent", "query", "for", "retrieval", ":"]
                              + [f"##{c}" for c in CHARS] + CHARS))


def _bert(tmp):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    (tmp / "vocab.txt").write_text("\n".join(_vocab(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])) + "\n")
    tok = BertTokenizerFast(str(tmp / "vocab.txt"), do_lower_case=True)  # positional: vocab_file (v4) / vocab (v5)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, initializer_range=INIT)
    return BertModel(cfg, add_pooling_layer=False), tok


def _mpnet_tokenizer(tmp):
    from transformers import MPNetTokenizerFast

    (tmp / "vocab.txt").write_text("\n".join(_vocab(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])) + "\n")
    tok = MPNetTokenizerFast(str(tmp / "vocab.txt"), do_lower_case=True, unk_token="<unk>")
    assert tok.pad_token_id == 1 and tok("cat")["input_ids"][0] == tok.convert_tokens_to_ids("<s>")
    return tok


def _mpnet(tmp):
    from transformers import MPNetConfig, MPNetModel

    tok = _mpnet_tokenizer(tmp)
    # relative_attention_num_buckets stays 32: HF's MPNet computes its bucket ids for 32
    cfg = MPNetConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=66, relative_attention_num_buckets=32,
                      pad_token_id=1, bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, initializer_range=INIT)
    return MPNetModel(cfg, add_pooling_layer=False), tok


def _roberta_like(tmp, config_cls, model_cls):
    tok = _mpnet_tokenizer(tmp)
    cfg = config_cls(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
                     bos_token_id=0, eos_token_id=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=INIT)
    return model_cls(cfg, add_pooling_layer=False), tok


def _roberta(tmp):
    from transformers import RobertaConfig, RobertaModel

    return _roberta_like(tmp, RobertaConfig, RobertaModel)


def _xlmr(tmp):
    from transformers import XLMRobertaConfig, XLMRobertaModel

    return _roberta_like(tmp, XLMRobertaConfig, XLMRobertaModel)


def _decoder(family: str, bidirectional: bool = False):
    def build(tmp):
        import importlib.util
        from pathlib import Path

        path = Path(__file__).resolve().parents[2] / "benchmarks" / "tiny_decoder.py"
        spec = importlib.util.spec_from_file_location("tiny_decoder_bench", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model, tok = module.build(None, family, init=INIT)
        model.config.is_causal = not bidirectional
        # float64: the EOS/pad row of the embedding gathers gradient from every text, and its float32
        # sums differ by ~5e-6 between batch shapes; in float64 any padding leak still shows, rounding does not
        return model.double(), tok

    return build


FAMILIES = {"bert": _bert, "mpnet": _mpnet, "roberta": _roberta, "xlm-roberta": _xlmr,
            "llama": _decoder("llama"), "qwen2": _decoder("qwen2"), "qwen3": _decoder("qwen3"),
            "qwen3-bidirectional": _decoder("qwen3", bidirectional=True)}
POOLINGS = [("mean", None), ("cls", None), ("last_token", None), ("mean", INSTRUCTION)]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    torch.manual_seed(0)
    backbone, tok = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, backbone, tok


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _batch():
    rng = random.Random(3)
    queries = [_text(rng, 1 + 4 * i) for i in range(B)]  # 1 .. 13 words (the longest truncated at 12 tokens)
    passages = [_text(rng, rng.choice([1, 2, 9, 30])) for _ in range(B * (M + N))]
    return queries, passages


def _encoder(backbone, tok, pooling: str) -> Encoder:
    enc = Encoder(backbone, tok, pooling=pooling, normalize=True, max_seq_length=64)
    enc.train()  # dropout is 0: train mode is deterministic and is what the loop runs
    enc.zero_grad(set_to_none=True)
    return enc


def _embed(enc: Encoder, texts: list[str], max_len: int, instruction, how: str) -> torch.Tensor:
    if how == "padded":
        return enc(enc.tokenize(texts, max_len, instruction=instruction))["embedding"]
    if how == "one_by_one":  # a batch of one: no padding anywhere
        rows = []
        for t in texts:
            feats = enc.tokenize([t], max_len, instruction=instruction)
            assert bool(feats["attention_mask"].all())
            rows.append(enc(feats)["embedding"])
        return torch.cat(rows)
    assert how.startswith("packed")  # the loop's unpadded forward, from codiemb.train.unpadded
    backend = how.partition(":")[2] or "reference"
    packed = pack_padded(enc.tokenize(texts, max_len))
    return mean_pool_packed(UnpaddedBert(enc.backbone, backend)(packed), packed)


def _loss_and_grads(enc: Encoder, instruction, how: str):
    queries, passages = _batch()
    q = _embed(enc, queries, MAX_LEN["query"], instruction, how)
    p = _embed(enc, passages, MAX_LEN["passage"], None, how).view(B, M + N, -1)
    loss = info_nce(q, p, num_positives=M, temperature=0.05, gather=False)
    loss.backward()
    grads = {n: t.grad.detach().clone() for n, t in enc.backbone.named_parameters() if t.grad is not None}
    enc.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-7)
    assert a[1].keys() == b[1].keys() and len(a[1]) >= 10  # embeddings and every layer
    for name in a[1]:
        # atol: float32 sums over different batch shapes; elements near 0 have no relative precision
        torch.testing.assert_close(a[1][name], b[1][name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_batch_really_pads_and_truncates(family):
    _, backbone, tok = family
    enc = _encoder(backbone, tok, "mean")
    queries, passages = _batch()
    feats = enc.tokenize(passages, MAX_LEN["passage"])
    lengths = feats["attention_mask"].sum(dim=1)
    assert int(lengths.min()) <= 4 and int(lengths.max()) == MAX_LEN["passage"]  # padding and truncation


@pytest.mark.parametrize("pooling,instruction", POOLINGS, ids=["mean", "cls", "last_token", "mean+instruction"])
def test_padded_equals_one_text_at_a_time(family, pooling, instruction):
    _, backbone, tok = family
    enc = _encoder(backbone, tok, pooling)
    _assert_same(_loss_and_grads(enc, instruction, "padded"), _loss_and_grads(enc, instruction, "one_by_one"))


def test_unpadded_forward_matches_where_supported_and_is_refused_elsewhere(family, tmp_path):
    name, backbone, tok = family
    enc = _encoder(backbone, tok, "mean")
    why = unsupported_reason(backbone)
    cfg = config_from_dict({"model": {"name": str(tmp_path)}, "train": {"retrieval_forward": "auto"}})
    td = TaskData(name="ret", task="retrieval", records=[], batch_size=B, num_positives=M, num_negatives=N)
    if why is None:
        assert retrieval_forward(cfg, enc, td, torch.device("cpu")) == "unpadded"
        padded = _loss_and_grads(enc, None, "padded")
        for backend in ("reference", "batched"):  # the per-text loop and the CPU default
            _assert_same(padded, _loss_and_grads(enc, None, f"packed:{backend}"))
    else:
        assert name != "bert", why
        assert retrieval_forward(cfg, enc, td, torch.device("cpu")) == "padded"
        with pytest.raises(ValueError, match="UnpaddedBert"):
            UnpaddedBert(backbone)
