"""Memory options of the loop (train/memory.py): bf16 weights, LoRA (peft), gradient checkpointing.

FSDP2 on two gloo ranks is in tests/unit/test_fsdp.py.
"""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from safetensors.torch import load_file

from codiemb.config import config_from_dict, load_config
from codiemb.model.encoder import Encoder
from codiemb.train import checkpoint as ckpt
from codiemb.train.fast_batches import make_adamw
from codiemb.train.loop import DistContext, TaskData, retrieval_loss, train

WORDS = "cat dog man woman child car house tree water fire sun moon red blue green big small".split()
TEXTS = ["the cat sleeps", "a dog runs in the house", "red sun", "big green tree water"]


def _write_data(tmp_path):
    rng = random.Random(0)
    sts, ret = tmp_path / "sts.jsonl", tmp_path / "ret.jsonl"
    with open(sts, "w") as fh:
        for _ in range(32):
            fh.write(json.dumps({"sentence1": " ".join(rng.sample(WORDS, 4)), "sentence2": " ".join(rng.sample(WORDS, 4)),
                                 "score": round(rng.uniform(0, 5), 1)}) + "\n")
    with open(ret, "w") as fh:
        for _ in range(32):
            q = " ".join(rng.sample(WORDS, 3))
            fh.write(json.dumps({"query": q, "positive": q + " " + rng.choice(WORDS),
                                 "negatives": [" ".join(rng.sample(WORDS, 4))]}) + "\n")
    return sts, ret


def _cfg(tmp_path, model_dir, *over):
    sts, ret = _write_data(tmp_path)
    f = tmp_path / "cfg.yaml"
    f.write_text(f"""
run: {{name: mem, seed: 1}}
model: {{name: {model_dir}, max_length: {{query: 16, passage: 16, sts: 16}}}}
data:
  datasets:
    - {{name: sts, task: sts, path: {sts}, score_range: [0, 5], batch_size: 8}}
    - {{name: ret, task: retrieval, path: {ret}, batch_size: 8}}
sampler: {{policy: round_robin}}
loss: {{retrieval: {{temperature: 0.05, negatives: 1}}}}
train: {{max_steps: 4, lr: 1.0e-3, warmup_ratio: 0.0, checkpoint_every: 0, log_every: 1}}
""")
    return load_config(f, list(over))


# --------------------------------------------------------------------------- bf16 weights
def test_bf16_weights_and_optimizer_state(tmp_path, tiny_model_dir):
    cfg = _cfg(tmp_path, tiny_model_dir, "train.param_dtype=bfloat16")
    res = train(cfg, output_dir=tmp_path / "run", stop_after=2)
    assert res.steps == 2 and all(v == v for v in res.final_losses.values())  # finite (NaN != NaN)
    step = ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    weights = load_file(str(step / "model" / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    opt = load_file(str(step / "optimizer.safetensors"))
    moments = {k: v for k, v in opt.items() if k.endswith(("exp_avg", "exp_avg_sq"))}
    stepped = json.loads((step / "optimizer.json").read_text())["state"]  # every parameter that got a gradient
    assert len(stepped) >= len(weights) - 2  # all but the pooler (its output is not used)
    assert len(moments) == 2 * len(stepped) and {v.dtype for v in moments.values()} == {torch.bfloat16}
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(weights[k].float(), base[k].to(torch.bfloat16).float()) for k in weights)
    rest = train(cfg, output_dir=tmp_path / "run")  # resumes in bf16
    assert rest.resumed_from == 2 and rest.steps == 4


# --------------------------------------------------------------------------- LoRA
LORA = {"r": 4, "alpha": 8.0, "target_modules": ["query", "value"]}


def _lora_encoder(model_dir):
    from codiemb.model.lora import add_lora

    cfg = config_from_dict({"model": {"name": str(model_dir), "lora": LORA}})
    enc = Encoder.load(str(model_dir))
    add_lora(enc, cfg.model.lora)
    return enc, cfg


def test_lora_trains_only_adapters(nodrop_model_dir):
    enc, cfg = _lora_encoder(nodrop_model_dir)
    h, layers = enc.dim, enc.num_layers
    trainable = {n: p for n, p in enc.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == layers * 2 * LORA["r"] * (h + h)  # A: r×h, B: h×r, 2 targets
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    frozen = {n: p.detach().clone() for n, p in enc.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    enc.train()
    opt = make_adamw(enc, 1e-2, 0.01, "cpu")
    rows = [{"query": t, "positives": [t + " dog"], "negatives": [TEXTS[(i + 1) % 4]]} for i, t in enumerate(TEXTS)]
    td = TaskData(name="r", task="retrieval", records=rows, batch_size=4, num_positives=1, num_negatives=1)
    for _ in range(2):  # B starts at 0: the first step moves B only, the second A too
        loss, _, _ = retrieval_loss(enc, rows, td, cfg, DistContext(), random.Random(0))
        loss.backward()
        opt.step()
        opt.zero_grad()
    for n, p in enc.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, frozen[n]), n


def test_lora_saves_merged_sentence_transformers_folder(nodrop_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer

    enc, _ = _lora_encoder(nodrop_model_dir)
    with torch.no_grad():  # adapters as training leaves them (B != 0)
        for n, p in enc.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.5)
    enc.eval()
    live = enc.encode(TEXTS)
    merged = copy.deepcopy(enc)
    merged.backbone = merged.backbone.merge_and_unload()  # peft's own merge, in memory
    ref = merged.encode(TEXTS)
    assert not torch.allclose(ref, Encoder.load(str(nodrop_model_dir)).encode(TEXTS), atol=1e-3)  # adapters matter
    torch.testing.assert_close(live, ref, rtol=1e-5, atol=1e-5)

    out = enc.save(tmp_path / "lora-model")
    saved = load_file(str(out / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in saved)
    assert saved.keys() == load_file(str(nodrop_model_dir / "model.safetensors")).keys()
    st = SentenceTransformer(str(out), device="cpu")
    got = torch.from_numpy(st.encode(TEXTS, convert_to_numpy=True))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_lora_training_resumes_exactly_and_saves_merged(tmp_path, tiny_model_dir):
    over = [f"model.lora={json.dumps(LORA)}", "train.checkpoint_every=2"]
    cfg = _cfg(tmp_path, tiny_model_dir, *over)
    full = train(cfg, output_dir=tmp_path / "full")
    part = train(cfg, output_dir=tmp_path / "res", stop_after=2)
    assert (ckpt.list_checkpoints(tmp_path / "res" / "checkpoints")[-1] / "trainable.safetensors").is_file()
    rest = train(cfg, output_dir=tmp_path / "res")
    assert part.steps == 2 and rest.resumed_from == 2
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "res" / "model" / "model.safetensors"))
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert a.keys() == b.keys() == base.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
        targeted = k.endswith(("query.weight", "value.weight"))
        assert torch.equal(a[k], base[k]) != targeted, k  # only the adapted weights moved (merged in)


def test_lora_refuses_the_unpadded_forward(tmp_path, tiny_model_dir):
    from codiemb.errors import ConfigError
    from codiemb.train.loop import retrieval_forward

    enc, cfg = _lora_encoder(tiny_model_dir)
    td = TaskData(name="r", task="retrieval", records=[{"query": "a", "positives": ["b"]}])
    cfg = config_from_dict({**cfg.to_dict(), "train": {"retrieval_forward": "auto"}})
    assert retrieval_forward(cfg, enc, td, torch.device("cpu")) == "padded"
    cfg = config_from_dict({**cfg.to_dict(), "train": {"retrieval_forward": "unpadded"}})
    with pytest.raises(ConfigError, match="model.lora"):
        retrieval_forward(cfg, enc, td, torch.device("cpu"))


# --------------------------------------------------------------------------- gradient checkpointing
@pytest.mark.parametrize("forward", ["padded", "unpadded"])
def test_gradient_checkpointing_same_loss_and_gradients(nodrop_model_dir, forward):
    rows = [{"query": t, "positives": [t + " dog", TEXTS[(i + 2) % 4]], "negatives": [TEXTS[(i + 1) % 4]]}
            for i, t in enumerate(TEXTS)]
    results = []
    for gc in (False, True):
        cfg = config_from_dict({"model": {"name": str(nodrop_model_dir), "gradient_checkpointing": gc,
                                          "max_length": {"query": 12, "passage": 16, "sts": 16}},
                                "loss": {"retrieval": {"positives": 2, "negatives": 1}},
                                "train": {"retrieval_forward": forward}})
        enc = Encoder.load(str(nodrop_model_dir))
        if gc:
            enc.enable_gradient_checkpointing()
        enc.train()
        td = TaskData(name="r", task="retrieval", records=rows, batch_size=4, num_positives=2, num_negatives=1)
        calls = []
        enc.backbone.encoder.layer[0].attention.register_forward_hook(lambda *a: calls.append(1))
        loss, _, _ = retrieval_loss(enc, rows, td, cfg, DistContext(), random.Random(0), idx=list(range(4)))
        loss.backward()
        if gc and forward == "padded":  # HF recomputed each layer in backward: its attention ran twice per forward
            assert len(calls) == 2 * 2
        results.append((loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7, msg=n)
