"""Encoder: pooling vs manual computation, save/load round trips, sentence-transformers compatibility."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from codiemb.errors import ModelError
from codiemb.model.encoder import LATENT_MODULE_DIR, LATENT_MODULE_TYPE, Encoder
from codiemb.model.pooling import LatentAttentionPooling, pool

@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir):
    return tiny_model_dir


TEXTS = ["the cat sleeps", "a big red dog runs in the house", "water", "the man reads a good study on cancer risk"]


# ----------------------------------------------------------------------------- pooling
HIDDEN = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
RIGHT = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
LEFT = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])


@pytest.mark.parametrize("mask", [RIGHT, LEFT], ids=["right-padding", "left-padding"])
def test_pool_kinds_match_manual(mask):
    for b in range(2):
        idx = [t for t in range(4) if mask[b, t]]
        assert torch.allclose(pool(HIDDEN, mask, "mean")[b], HIDDEN[b, idx].mean(0))
        assert torch.equal(pool(HIDDEN, mask, "cls")[b], HIDDEN[b, idx[0]])
        assert torch.equal(pool(HIDDEN, mask, "last_token")[b], HIDDEN[b, idx[-1]])


def test_pool_rejects_unknown_kind():
    with pytest.raises(ValueError):
        pool(HIDDEN, RIGHT, "max")


def test_latent_attention_starts_as_mean_pooling_and_learns():
    torch.manual_seed(0)
    head = LatentAttentionPooling(hidden_dim=8, num_latents=4, num_heads=2)
    h = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert torch.allclose(head(h, mask), pool(h, mask, "mean"), atol=1e-6)
    head(h, mask).pow(2).sum().backward()
    assert head.attn.out_proj.weight.grad.abs().sum() > 0  # the zero-initialised layers still learn
    assert head.mlp[2].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- encoder
@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return Encoder.load(str(tiny_dir))


def _manual_hidden(folder, texts, max_length=128):
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return enc, out


def test_plain_hf_folder_defaults(tiny):
    assert tiny.pooling == "mean" and tiny.normalize is True
    assert tiny.max_seq_length == 128  # capped by max_position_embeddings of the tiny BERT
    assert tiny.dim == 32 and tiny.num_layers == 2
    assert not tiny.training and not tiny.backbone.training  # eval mode, as from_pretrained gives
    a, b = tiny.encode(["the cat sleeps", "the dog sleeps"])  # same length, different words
    assert not torch.allclose(a, b, atol=1e-3)


def test_forward_is_mean_pooling_and_layers(tiny, tiny_dir):
    enc, out = _manual_hidden(tiny_dir, TEXTS)
    feats = tiny.tokenize(TEXTS, 128)
    assert set(feats) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        res = tiny.eval()(feats, layers=[0, 1, 2])
    m = enc["attention_mask"].unsqueeze(-1).float()
    manual = (out.last_hidden_state * m).sum(1) / m.sum(1)
    assert torch.allclose(res["embedding"], manual, atol=1e-5)
    assert torch.allclose(res["layer_embeddings"][2], res["embedding"], atol=1e-6)
    layer0 = (out.hidden_states[0] * m).sum(1) / m.sum(1)
    assert torch.allclose(res["layer_embeddings"][0], layer0, atol=1e-5)
    assert not torch.allclose(res["layer_embeddings"][1], res["embedding"], atol=1e-3)


def test_encode_restores_order_and_normalizes(tiny):
    batch = tiny.encode(TEXTS, batch_size=3)
    assert batch.dtype == torch.float32 and batch.shape == (4, 32) and batch.device.type == "cpu"
    assert torch.allclose(batch.norm(dim=1), torch.ones(4), atol=1e-5)
    for i, t in enumerate(TEXTS):
        assert torch.allclose(tiny.encode([t])[0], batch[i], atol=1e-5)
    raw = tiny.encode(TEXTS, normalize=False, convert_to_numpy=True)
    assert raw.shape == (4, 32)
    assert torch.allclose(torch.nn.functional.normalize(torch.from_numpy(raw), dim=1), batch, atol=1e-5)


def test_instruction_is_left_out_of_mean_pooling(tiny, tiny_dir):
    inst = "the study shows "
    feats = tiny.tokenize(["a red car", "the dog"], 64, instruction=inst)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    n_inst = len(tok(inst, add_special_tokens=False)["input_ids"])  # 3 words
    assert n_inst == 3
    # [CLS] + 3 instruction tokens are excluded; text tokens and [SEP] are pooled
    assert feats["pool_mask"][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert feats["pool_mask"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    with torch.no_grad():
        emb = tiny.eval()(feats)["embedding"]
        hidden = tiny.backbone(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"]).last_hidden_state
    assert torch.allclose(emb[0], hidden[0, 4:8].mean(0), atol=1e-5)
    assert torch.allclose(emb[1], hidden[1, 4:7].mean(0), atol=1e-5)


def test_truncation_keeps_the_instruction(tiny, tiny_dir):
    inst = "the study shows "
    feats = tiny.tokenize(["cat dog " * 50], 10, instruction=inst)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    ids = feats["input_ids"][0].tolist()
    assert len(ids) == 10
    assert ids[:4] == [tok.cls_token_id] + tok(inst, add_special_tokens=False)["input_ids"]
    assert ids[-1] == tok.sep_token_id
    assert feats["pool_mask"][0].sum() == 10 - 4
    with pytest.raises(ValueError):
        tiny.tokenize(["cat"], 4, instruction=inst)


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False), ("last_token", True)])
def test_save_load_round_trip_and_sentence_transformers(tiny_dir, tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    enc = Encoder.load(str(tiny_dir), pooling=pooling, normalize=normalize)
    enc.max_seq_length = 64
    ref = enc.encode(TEXTS, normalize=normalize)
    out = enc.save(tmp_path / "model")
    modules = json.loads((out / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling"] + (["2_Normalize"] if normalize else [])
    assert (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".model.*"))  # temp dirs are gone

    again = Encoder.load(str(out))
    assert (again.pooling, again.normalize, again.max_seq_length) == (pooling, normalize, 64)
    assert torch.allclose(again.encode(TEXTS, normalize=normalize), ref, atol=1e-5)

    st = SentenceTransformer(str(out), device="cpu")
    assert st.max_seq_length == 64
    st_emb = st.encode(TEXTS, convert_to_tensor=True).cpu()
    assert torch.allclose(st_emb, ref, atol=1e-5)


def test_save_replaces_existing_folder(tiny, tmp_path):
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    tiny.save(target)
    assert not (target / "stale.txt").exists()
    assert (target / "modules.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_latent_attention_round_trip(tiny_dir, tmp_path):
    enc = Encoder.load(str(tiny_dir), pooling="latent_attention")
    assert enc.latent_pooling is not None
    mean = Encoder.load(str(tiny_dir))
    assert torch.allclose(enc.encode(TEXTS), mean.encode(TEXTS), atol=1e-5)  # zero-initialised head
    torch.manual_seed(1)
    with torch.no_grad():
        for p in enc.latent_pooling.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref = enc.encode(TEXTS)
    assert not torch.allclose(ref, mean.encode(TEXTS), atol=1e-3)
    out = enc.save(tmp_path / "la")
    modules = json.loads((out / "modules.json").read_text())
    assert modules[1] == {"idx": 1, "name": "1", "path": LATENT_MODULE_DIR, "type": LATENT_MODULE_TYPE}
    assert (out / LATENT_MODULE_DIR / "model.safetensors").is_file()
    again = Encoder.load(str(out))
    assert again.pooling == "latent_attention"
    assert torch.allclose(again.encode(TEXTS), ref, atol=1e-6)


def test_gradient_checkpointing_gives_same_gradients(tiny_dir):
    feats = None
    grads = []
    for ckpt in (False, True):
        enc = Encoder.load(str(tiny_dir)).train()
        enc.backbone.config.hidden_dropout_prob = 0.0
        for m in enc.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        if ckpt:
            enc.enable_gradient_checkpointing()
        feats = feats or enc.tokenize(TEXTS, 32)
        enc(feats)["embedding"].pow(2).sum().backward()
        grads.append(enc.backbone.embeddings.word_embeddings.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_missing_or_bad_folder_raises_model_error(tmp_path):
    with pytest.raises(ModelError, match="not found|not a local folder"):
        Encoder.load(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        Encoder.load(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    (bad / "1_Pooling").mkdir(parents=True)
    (bad / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (bad / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                               "pooling_mode_max_tokens": True}))
    with pytest.raises(ModelError, match="not supported"):
        Encoder.load(str(bad))
