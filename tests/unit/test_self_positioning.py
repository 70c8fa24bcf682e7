"""Self Positioning on a tiny MLP (two specialists) and on the tiny BERT via functional_call."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from codiemb.errors import UserError
from codiemb.merge.methods import merge_state_dicts
from codiemb.merge.self_positioning import embedding_probe, self_position


class MLP(nn.Module):
    """A tiny "encoder": forward takes a features dict like the training loop's encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 4)

    def forward(self, features):
        return {"embedding": self.l2(torch.tanh(self.l1(features["x"])))}


def _inputs(n: int, half: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, 8, generator=gen)
    if half == 0:
        x[:, 4:] = 0
    else:
        x[:, :4] = 0
    return x


def _task_loss(forward, x, w):
    return ((forward({"x": x})["embedding"] - x @ w) ** 2).mean()


def _loss_of(module: nn.Module, state: dict, probe) -> float:
    """Independent evaluation: load the state dict into a copy and call the module normally."""
    m = copy.deepcopy(module)
    m.load_state_dict(state)
    m.eval()
    with torch.no_grad():
        return float(probe(m))


@pytest.fixture(scope="module")
def specialists():
    """Base MLP and two specialists: SGD from the base on task A (inputs in dims 0-3, target x@WA)
    and on task B (inputs in dims 4-7, target x@WB)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    net = MLP()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    wa, wb = torch.randn(8, 4, generator=gen), torch.randn(8, 4, generator=gen)
    xa, xb = _inputs(64, 0, gen), _inputs(64, 1, gen)

    def train(w, x):
        m = copy.deepcopy(net)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        for _ in range(150):
            opt.zero_grad()
            _task_loss(m, x, w).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in m.state_dict().items()}

    probe_a, probe_b = _inputs(32, 0, gen), _inputs(32, 1, gen)
    return {
        "net": net, "base": base, "models": [train(wa, xa), train(wb, xb)],
        "probe_a": lambda f: _task_loss(f, probe_a, wa),
        "probe_b": lambda f: _task_loss(f, probe_b, wb),
    }


def test_self_positioning_beats_uniform_soup(specialists):
    s = specialists
    net, base, models = s["net"], s["base"], s["models"]
    before = {k: v.clone() for k, v in net.state_dict().items()}

    def probe(f):  # balanced: half task A, half task B
        return 0.5 * s["probe_a"](f) + 0.5 * s["probe_b"](f)

    uniform = _loss_of(net, merge_state_dicts("uniform_soup", base, models), probe)
    res = self_position(net, base, models, probe, steps=60, lr=0.05, mu=0.01)

    # the start point (a = ½, λ = 1) is the uniform soup: J0 = uniform loss + μ·1
    assert res.history[0] == pytest.approx(uniform + 0.01, rel=1e-5)
    assert len(res.history) == 61
    # independent check of the returned state dict, and a clear improvement over the soup
    got = _loss_of(net, res.state_dict, probe)
    assert got == pytest.approx(res.probe_loss, rel=1e-5)
    assert got < 0.5 * uniform
    # the two disjoint tasks want both vectors at more than half strength: λ grows, a stays ~½
    assert res.lam > 1.2
    assert sum(res.coefficients) == pytest.approx(1.0)
    assert abs(res.coefficients[0] - 0.5) < 0.1
    # the state dict is θ0 + λ Σ a_k Δ_k
    want = merge_state_dicts("task_arithmetic", base, models, weights=res.coefficients, lam=res.lam)
    for k in base:
        assert torch.allclose(res.state_dict[k], want[k], atol=1e-5)
    # weights frozen: the module itself is untouched
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])


def test_self_positioning_moves_coefficients_toward_the_probed_task(specialists):
    s = specialists
    res_a = self_position(s["net"], s["base"], s["models"], s["probe_a"], steps=60, lr=0.05, mu=0.01)
    res_b = self_position(s["net"], s["base"], s["models"], s["probe_b"], steps=60, lr=0.05, mu=0.01)
    assert res_a.coefficients[0] > 0.7
    assert res_b.coefficients[1] > 0.7
    uniform = merge_state_dicts("uniform_soup", s["base"], s["models"])
    assert _loss_of(s["net"], res_a.state_dict, s["probe_a"]) < _loss_of(s["net"], uniform, s["probe_a"])


def test_self_positioning_validates_inputs(specialists):
    s = specialists
    with pytest.raises(UserError, match="mu < 0.05"):
        self_position(s["net"], s["base"], s["models"], s["probe_a"], mu=0.05)
    bad = {**s["base"], "extra": torch.zeros(1)}
    with pytest.raises(UserError, match="'extra'"):
        self_position(s["net"], bad, [{**m, "extra": torch.ones(1)} for m in s["models"]], s["probe_a"])
    with pytest.raises(UserError, match="lacks tensor"):
        self_position(s["net"], s["base"], [{"l1.weight": s["base"]["l1.weight"]}], s["probe_a"])


class MeanPoolBert(nn.Module):
    """transformers AutoModel + masked mean pooling; forward(features) -> {"embedding": (B, D)}."""

    def __init__(self, folder) -> None:
        super().__init__()
        from transformers import AutoModel

        self.backbone = AutoModel.from_pretrained(str(folder))

    def forward(self, features):
        mask = features["attention_mask"]
        out = self.backbone(input_ids=features["input_ids"], attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(out.dtype)
        return {"embedding": (out * m).sum(1) / m.sum(1).clamp_min(1.0)}


def test_functional_call_over_tiny_hf_bert(tiny_model_dir):
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    enc = MeanPoolBert(tiny_model_dir)
    base = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    models = [
        {k: (v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v.clone())
         for k, v in base.items()}
        for _ in range(2)
    ]

    def feats(texts):
        t = tok(texts, padding=True, return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    q = feats(["the cat sleeps", "protein gene study", "the car is red", "water and fire"])
    p = feats(["a cat is sleeping", "gene protein effect", "a red car", "fire and water"])
    s1 = feats(["the dog runs", "the man reads", "a big tree", "the moon is high"])
    s2 = feats(["a dog walks", "the woman writes", "a small house", "the sun is low"])
    scores = torch.tensor([4.0, 2.0, 1.0, 3.0])
    probe = embedding_probe(ir=(q, p), sts=(s1, s2, scores))

    res = self_position(enc, base, models, probe, steps=3, lr=0.05, mu=0.01)
    assert len(res.history) == 4 and all(math.isfinite(h) for h in res.history)
    assert sum(res.coefficients) == pytest.approx(1.0)
    assert res.lam >= 0
    # history[0] is the uniform soup evaluated through functional_call; check it with a plain forward
    uniform = merge_state_dicts("uniform_soup", base, models)
    assert res.history[0] == pytest.approx(_loss_of(enc, uniform, probe) + 0.01, rel=1e-4)
    # the returned state dict reproduces the probe loss seen through functional_call
    assert _loss_of(enc, res.state_dict, probe) == pytest.approx(res.probe_loss, rel=1e-4)
    # the real module's weights were never written
    for k, v in enc.state_dict().items():
        assert torch.equal(v, base[k])


def test_parameter_groups_of_bert_keys():
    from codiemb.merge.self_positioning import parameter_group

    assert parameter_group("0.auto_model.encoder.layer.3.attention.self.query.weight") == "layer.3"
    assert parameter_group("encoder.layer.11.output.dense.bias") == "layer.11"
    assert parameter_group("0.auto_model.embeddings.word_embeddings.weight") == "embeddings"
    assert parameter_group("0.auto_model.pooler.dense.weight") == "other"
    assert parameter_group("model.layers.0.mlp.up_proj.weight") == "layer.0"  # decoder-style names
    assert parameter_group("player.1.weight") == "other"  # 'layer' must be a whole name part


class TwoLayers(nn.Module):
    """forward returns the flattened parameters, so the probe below is a quadratic in θ."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])

    def forward(self, features):
        return {"embedding": torch.cat([p.reshape(-1) for p in self.parameters()])}


def test_layer_granularity_takes_each_layer_from_its_own_task():
    """Both specialists moved both layers, and the probe wants layer 0 from A and layer 1 from B:
    one (a, λ) for the whole model cannot get there, one per layer can."""
    from codiemb.merge.self_positioning import parameter_group

    torch.manual_seed(0)
    net = TwoLayers()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    da = {k: torch.randn_like(v) for k, v in base.items()}
    db = {k: torch.randn_like(v) for k, v in base.items()}
    models = [{k: base[k] + da[k] for k in base}, {k: base[k] + db[k] for k in base}]
    target_sd = {k: base[k] + (da[k] if k.startswith("layer.0.") else db[k]) for k in base}
    target = torch.cat([target_sd[k].reshape(-1) for k, _ in net.named_parameters()])

    def probe(f):
        return ((f({})["embedding"] - target) ** 2).mean()

    whole = self_position(net, base, models, probe, steps=150, lr=0.05, mu=0.0, coefficients="plain")
    layer = self_position(net, base, models, probe, steps=150, lr=0.05, mu=0.0, coefficients="plain",
                          granularity="layer")
    assert set(layer.groups) == {"layer.0", "layer.1"}
    assert layer.probe_loss < 0.05 * whole.probe_loss
    assert layer.groups["layer.0"]["coefficients"][0] * layer.groups["layer.0"]["lam"] == pytest.approx(1.0, abs=0.05)
    assert layer.groups["layer.1"]["coefficients"][1] * layer.groups["layer.1"]["lam"] == pytest.approx(1.0, abs=0.05)
    # the state dict is θ0 + λ_g Σ a_gk Δ_k, group by group
    for k in base:
        gp = layer.groups[parameter_group(k)]
        want = base[k] + gp["lam"] * (gp["coefficients"][0] * da[k] + gp["coefficients"][1] * db[k])
        assert torch.allclose(layer.state_dict[k], want, atol=1e-5)
    # the model-wise result keeps its one (a, λ) and no groups
    assert whole.groups == {}
    with pytest.raises(UserError, match="granularity"):
        self_position(net, base, models, probe, granularity="row")
    with pytest.raises(UserError, match="select"):
        self_position(net, base, models, probe, select="first")


def test_minibatch_probe_draws_from_torch_rng(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    enc = MeanPoolBert(tiny_model_dir).eval()

    def feats(texts):
        t = tok(texts, padding=True, return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    q = ["the cat sleeps", "protein gene study of a very long title here", "the car is red", "water"]
    p = ["a cat is sleeping", "gene protein effect", "a red car in the street today", "fire and water"]
    s1, s2 = ["the dog runs", "the man reads", "a big tree", "the moon is high"], ["a dog", "the woman writes",
                                                                                   "a small house", "sun"]
    scores = torch.tensor([4.0, 2.0, 1.0, 3.0])
    mb = embedding_probe(ir=(feats(q), feats(p)), sts=(feats(s1), feats(s2), scores), batch_size=2)
    everything = embedding_probe(ir=(feats(q), feats(p)), sts=(feats(s1), feats(s2), scores), batch_size=4)
    full = embedding_probe(ir=(feats(q), feats(p)), sts=(feats(s1), feats(s2), scores))
    with torch.no_grad():
        assert float(everything(enc)) == pytest.approx(float(full(enc)), rel=1e-6)
        torch.manual_seed(5)
        got = float(mb(enc))
        torch.manual_seed(5)
        i, j = torch.randperm(4)[:2].tolist(), torch.randperm(4)[:2].tolist()
        sub = embedding_probe(ir=(feats([q[x] for x in i]), feats([p[x] for x in i])),
                              sts=(feats([s1[x] for x in j]), feats([s2[x] for x in j]), scores[j]))
        assert got == pytest.approx(float(sub(enc)), rel=1e-5)


def test_balanced_probe_weighs_each_task_by_its_start_loss(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    enc = MeanPoolBert(tiny_model_dir).eval()
    moved = copy.deepcopy(enc)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def feats(texts):
        t = tok(texts, padding=True, return_tensors="pt")
        return {"input_ids": t["input_ids"], "attention_mask": t["attention_mask"]}

    ir = (feats(["the cat sleeps", "protein gene study", "the car is red"]),
          feats(["a cat is sleeping", "gene protein effect", "a red car"]))
    sts = (feats(["the dog runs", "the man reads", "a big tree"]), feats(["a dog walks", "the woman writes", "a house"]),
           torch.tensor([4.0, 2.0, 1.0]))
    balanced = embedding_probe(ir=ir, sts=sts, balance="start")
    ir_only, sts_only = embedding_probe(ir=ir), embedding_probe(sts=sts)
    with torch.no_grad():
        assert float(balanced(enc)) == pytest.approx(1.0)  # the first call sets the scale: 1 per task
        want = 0.5 * float(ir_only(moved)) / float(ir_only(enc)) + 0.5 * float(sts_only(moved)) / float(sts_only(enc))
        assert float(balanced(moved)) == pytest.approx(want, rel=1e-5)
    with pytest.raises(UserError, match="balance"):
        embedding_probe(ir=ir, balance="max")
