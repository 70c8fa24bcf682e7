"""``loss.matryoshka.layers: true`` (2D Matryoshka) reaches the training loop's losses.

Reference: the loss written out by hand from the encoder's per-layer pooled embeddings, with
``info_nce``, ``matryoshka`` and ``layer_kl`` (the pieces each tested on their own) and the same
layer that the step-seeded generator picks.
"""

from __future__ import annotations

import random

import pytest
import torch

from codiemb.config import config_from_dict
from codiemb.losses.ir import info_nce
from codiemb.losses.matryoshka import layer_kl, matryoshka
from codiemb.model.encoder import Encoder
from codiemb.train.loop import DistContext, TaskData, retrieval_loss, sts_loss_step

ROWS = [{"query": "red car", "positives": ["a red car on the road"], "negatives": []},
        {"query": "big tree", "positives": ["the tree is big and green"], "negatives": []},
        {"query": "moon", "positives": ["the moon at night, small and white"], "negatives": []}]
STS = [{"sentence1": "a cat", "sentence2": "a small cat", "score": 4.0},
       {"sentence1": "a dog runs", "sentence2": "the sun is red", "score": 0.5},
       {"sentence1": "a man", "sentence2": "a woman", "score": 2.0}]


def _cfg(nodrop_model_dir, layers: bool):
    return config_from_dict({
        "model": {"name": str(nodrop_model_dir), "max_length": {"query": 12, "passage": 16, "sts": 12}},
        "loss": {"retrieval": {"temperature": 0.05, "positives": 1, "negatives": 0},
                 "sts": {"cosent": 1.0, "pearson": 0.0, "rank_kl": 0.0, "pro": 0.0, "mid_nce": 0.0},
                 "matryoshka": {"dims": [8, 4], "layers": layers, "layer_kl_weight": 0.7}},
        "train": {"retrieval_forward": "padded"},
    })


def _chosen_layer(seed: int, n_earlier: int) -> int:
    return torch.randperm(n_earlier, generator=torch.Generator().manual_seed(seed)).tolist()[0]


def test_retrieval_2d_loss_equals_the_hand_written_one(nodrop_model_dir):
    enc = Encoder.load(str(nodrop_model_dir))
    enc.train()
    n_layers = enc.num_layers
    assert n_layers >= 2, "the fixture model needs an earlier layer"
    td = TaskData(name="r", task="retrieval", records=ROWS, batch_size=3, num_positives=1, num_negatives=0)
    cfg = _cfg(nodrop_model_dir, True)
    seed = 12345
    loss, _, _ = retrieval_loss(enc, ROWS, td, cfg, DistContext(), random.Random(0), layer_seed=seed)

    with torch.no_grad():
        qf = enc.tokenize([r["query"] for r in ROWS], 12)
        pf = enc.tokenize([r["positives"][0] for r in ROWS], 16)
        earlier = list(range(1, n_layers))
        qo, po = enc(qf, layers=earlier), enc(pf, layers=earlier)
        m = matryoshka(lambda a, b: info_nce(a, b, 1, temperature=0.05), [8, 4])
        last = m(qo["embedding"], po["embedding"].view(3, 1, -1))
        l0 = _chosen_layer(seed, n_layers - 1)  # 0-based transformer layer = hidden_states index - 1
        q_l, p_l = qo["layer_embeddings"][l0 + 1], po["layer_embeddings"][l0 + 1].view(3, 1, -1)
        prior = m(q_l, p_l) / (1 + l0)
        kl = (layer_kl(q_l, qo["embedding"]) + layer_kl(p_l, po["embedding"].view(3, 1, -1))) / 2
        expected = last + prior + 0.7 * kl
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    plain, _, _ = retrieval_loss(enc, ROWS, td, _cfg(nodrop_model_dir, False), DistContext(), random.Random(0))
    assert abs(float(loss.detach()) - float(plain.detach())) > 1e-4  # the earlier layer really counts


def test_sts_2d_loss_adds_the_earlier_layer_and_kl(nodrop_model_dir):
    enc = Encoder.load(str(nodrop_model_dir))
    enc.train()
    td = TaskData(name="s", task="sts", records=STS, batch_size=3, score_range=(0.0, 5.0))
    seed = 7
    loss, _, _ = sts_loss_step(enc, STS, td, _cfg(nodrop_model_dir, True), DistContext(), layer_seed=seed)
    plain, _, _ = sts_loss_step(enc, STS, td, _cfg(nodrop_model_dir, False), DistContext())
    loss.backward()
    # every layer's weights get a gradient, the embeddings too
    assert all(p.grad is not None for n, p in enc.backbone.named_parameters() if "encoder.layer" in n and "weight" in n)
    assert float(loss) > float(plain)  # prior-layer CoSENT (>= 0) and KL (>= 0) are added to the same last-layer term
    # the same seed picks the same layer: the loss is reproducible
    again, _, _ = sts_loss_step(enc, STS, td, _cfg(nodrop_model_dir, True), DistContext(), layer_seed=seed)
    assert float(again) == pytest.approx(float(loss), rel=1e-6)
