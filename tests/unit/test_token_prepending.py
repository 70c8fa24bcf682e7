"""Token Prepending (issue 18 item 1; Fu et al. 2024, arXiv 2412.11556) on tiny random decoders.

Two 4-layer decoders from ``benchmarks/tiny_decoder.py`` (the helpers ``test_decoder.py`` uses):
a Llama whose tokenizer adds a BOS token (placeholder at position 1) and a Qwen3 whose tokenizer
adds none (placeholder at position 0). Batches are right-padded with rows of different lengths.

(a) with it on, the placeholder's state ENTERING layer l equals the last-token state that layer
    l-1 output, per row, for every l in the range; outside the range it is left alone;
(b) the embedding differs from plain last-token pooling (of the same ids, and of the plain encoder);
(c) with it off (no block, or ``enabled: false``), tokenize and embeddings are the plain encoder's (1e-6);
(d) the template and the placeholder are in the ids; (e) ``output_layer`` pools that hidden state.
"""

from __future__ import annotations

import pytest
import torch

from codiemb.errors import ConfigError, ModelError
from codiemb.model.encoder import Encoder
from codiemb.model.pooling import last_token_pool
from codiemb.model.token_prepending import PLACEHOLDER_KEY, PROMPT_EOL, TokenPrepending, decoder_layers

TEXTS = ["the cat", "a dog runs in the house with a red car and the sun is high", "protein cell",
         "the man sees the big tree"]
TP = {"start_layer": 1, "end_layer": 3}  # of 4 layers: layer 3 (and layer 0) are outside the range


@pytest.fixture(scope="module")
def decoders(load_benchmark, tmp_path_factory):
    """{"llama-bos": folder, "qwen3": folder}: 4 decoder layers each."""
    td = load_benchmark("tiny_decoder")
    out = {name: tmp_path_factory.mktemp(f"tp-{name}") for name in ("qwen3", "llama-bos")}
    tok = td.build_tokenizer()  # trained once (seconds) for both
    for name in ("qwen3", "llama-bos"):
        if name == "llama-bos":
            tok.add_special_tokens({"bos_token": "<s>"})  # a BOS of its own, added to every text
            tok.add_bos_token = True
        torch.manual_seed(0)
        model = td.build_model(name.split("-")[0], len(tok), layers=4, eos_id=tok.eos_token_id)
        tok.save_pretrained(out[name])
        model.save_pretrained(out[name], safe_serialization=True)
    return out


@pytest.fixture(params=["llama-bos", "qwen3"])
def folder(request, decoders):
    return decoders[request.param]


@pytest.fixture
def llama(decoders):  # the BOS case (placeholder at 1) for the tests that need only one family
    return decoders["llama-bos"]


def _load(folder, **kw) -> Encoder:
    return Encoder.load(str(folder), pooling="last_token", **kw).eval()


def _record(encoder, features):
    """Run ``encoder`` on ``features``; return (inputs, outputs): each decoder layer's hidden-state
    input (as the layer received it, after any pre-hook) and output."""
    inputs, outputs, handles = {}, {}, []
    for i, layer in enumerate(decoder_layers(encoder.backbone)):
        def hook(module, args, kwargs, output, i=i):
            inputs[i] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            outputs[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        handles.append(layer.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            emb = encoder(features)["embedding"]
    finally:
        for h in handles:
            h.remove()
    return emb, inputs, outputs


def test_placeholder_input_is_previous_layers_last_token_per_row(folder):
    enc = _load(folder, token_prepending=TP)
    feats = enc.tokenize(TEXTS)
    mask = feats["attention_mask"]
    lengths = mask.sum(dim=1)
    assert len(set(lengths.tolist())) == len(TEXTS) and bool(mask[:, 0].all())  # right padding, all lengths differ
    last = lengths - 1
    p = int(feats[PLACEHOLDER_KEY][0])
    has_bos = "tp-llama" in str(folder)
    assert p == int(has_bos)
    if has_bos:  # right after BOS
        assert (feats["input_ids"][:, 0] == enc.tokenizer.convert_tokens_to_ids("<s>")).all()
    assert (feats[PLACEHOLDER_KEY] == p).all()
    _, inputs, outputs = _record(enc, feats)
    rows = torch.arange(len(TEXTS))
    for l in range(1, enc.num_layers):
        entering, prev_out = inputs[l][rows, p], outputs[l - 1]
        if TP["start_layer"] <= l < TP["end_layer"]:
            torch.testing.assert_close(entering, prev_out[rows, last], rtol=0, atol=1e-6, msg=f"layer {l}")
            assert (entering - prev_out[rows, p]).abs().amax(dim=-1).min() > 1e-3  # it was replaced in every row
            # the padded rows' final column is a pad state, not the last token: a "-1" reading would fail
            short = lengths < mask.size(1)
            assert (prev_out[short, -1] - prev_out[rows[short], last[short]]).abs().amax() > 1e-3
        else:  # outside the range the placeholder flows on unchanged
            torch.testing.assert_close(entering, prev_out[rows, p], rtol=0, atol=0, msg=f"layer {l}")
        # every other position enters as the previous layer left it
        keep = torch.ones(mask.size(1), dtype=torch.bool)
        keep[p] = False
        torch.testing.assert_close(inputs[l][:, keep], prev_out[:, keep], rtol=0, atol=0)


def test_rows_are_independent_of_the_batch(llama):
    """Right padding and the per-row last token: a text embeds alike alone and in a padded batch."""
    enc = _load(llama, token_prepending=TP)
    batch = enc.encode(TEXTS, batch_size=len(TEXTS))
    alone = torch.cat([enc.encode([t]) for t in TEXTS])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)


def test_output_differs_from_plain_last_token_pooling(llama):
    enc = _load(llama, token_prepending=TP)
    feats = enc.tokenize(TEXTS)
    with torch.no_grad():
        tp = enc(feats)["embedding"]
        same_ids = enc.backbone(input_ids=feats["input_ids"], attention_mask=feats["attention_mask"])
    no_hooks = last_token_pool(same_ids.last_hidden_state, feats["attention_mask"])
    assert (tp - no_hooks).abs().amax(dim=-1).min() > 1e-3  # the hooks change every row
    plain = _load(llama)
    assert (enc.encode(TEXTS) - plain.encode(TEXTS)).abs().amax(dim=-1).min() > 1e-3


@pytest.mark.parametrize("off", [None, {"enabled": False, **TP}], ids=["none", "enabled-false"])
def test_off_is_the_plain_encoder(llama, off):
    from codiemb.config import TokenPrependingConfig

    block = TokenPrependingConfig(**off) if off else None
    plain, enc = _load(llama), _load(llama, token_prepending=block)
    assert enc.token_prepending is None
    a, b = plain.tokenize(TEXTS), enc.tokenize(TEXTS)
    assert a.keys() == b.keys() and PLACEHOLDER_KEY not in b
    assert all(torch.equal(a[k], b[k]) for k in a)
    torch.testing.assert_close(enc.encode(TEXTS), plain.encode(TEXTS), rtol=0, atol=1e-6)
    with torch.no_grad():  # and plain is what it always was: the backbone's last token
        ref = last_token_pool(plain.backbone(**a).last_hidden_state, a["attention_mask"])
    torch.testing.assert_close(plain(a)["embedding"], ref, rtol=0, atol=1e-6)
    assert plain.tokenizer("the cat")["input_ids"][-1] == plain.tokenizer.eos_token_id  # EOS as before


def test_template_and_placeholder_are_in_the_ids(folder):
    custom = 'Text: "{text}" in a word:"'
    plain = _load(folder, append_eos=False)
    for template in (None, custom):  # None: the default, PromptEOL
        kw = {} if template is None else {"template": template}
        enc = _load(folder, token_prepending={**TP, **kw})
        assert enc.tokenizer("a")["input_ids"][-1] != enc.tokenizer.eos_token_id  # no EOS: the quote is last
        feats = enc.tokenize(TEXTS)
        p = int(feats[PLACEHOLDER_KEY][0])
        want = plain.tokenize([(template or PROMPT_EOL).replace("{text}", t) for t in TEXTS])
        keep = [i for i in range(feats["input_ids"].size(1)) if i != p]
        assert torch.equal(feats["input_ids"][:, keep], want["input_ids"])
        assert torch.equal(feats["attention_mask"][:, keep], want["attention_mask"])
        assert (feats["attention_mask"][:, p] == 1).all()
        assert (feats["input_ids"][:, p] == enc.tokenizer.pad_token_id).all()  # the stand-in id
        decoded = enc.tokenizer.decode(feats["input_ids"][0, p + 1:int(feats["attention_mask"][0].sum())])
        assert decoded == (template or PROMPT_EOL).replace("{text}", TEXTS[0])
    # an instruction goes before the template; max_length counts the placeholder
    feats = _load(folder, token_prepending=TP).tokenize(TEXTS, max_length=12, instruction="Query: ")
    assert feats["input_ids"].size(1) == 12


def test_placeholder_embedding_mean_or_an_existing_token(llama):
    enc = _load(llama, token_prepending=TP)
    feats = enc.tokenize(TEXTS[:2])
    p = int(feats[PLACEHOLDER_KEY][0])
    _, inputs, _ = _record(enc, feats)
    mean = enc.backbone.get_input_embeddings().weight.mean(dim=0)
    torch.testing.assert_close(inputs[0][:, p], mean.expand(2, -1), rtol=0, atol=1e-6)
    name = "Ġprotein"  # a vocabulary entry (byte-level BPE spells the leading space Ġ)
    named = _load(llama, token_prepending={**TP, "placeholder": name})
    ids = named.tokenize(TEXTS[:2])["input_ids"]
    token = named.tokenizer.convert_tokens_to_ids(name)
    assert token != named.tokenizer.unk_token_id and token != named.tokenizer.pad_token_id
    assert (ids[:, p] == token).all()
    _, inputs, _ = _record(named, named.tokenize(TEXTS[:2]))
    torch.testing.assert_close(inputs[0][:, p], named.backbone.get_input_embeddings().weight[token].expand(2, -1),
                               rtol=0, atol=0)
    with pytest.raises(ModelError, match="vocabulary"):
        _load(llama, token_prepending={**TP, "placeholder": "<PST>"})


@pytest.mark.parametrize("layer", [2, -2])
def test_output_layer_pools_an_intermediate_layer(llama, layer):
    enc = _load(llama, token_prepending={**TP, "output_layer": layer})
    last_layer = _load(llama, token_prepending=TP)
    feats = enc.tokenize(TEXTS)
    emb, _, outputs = _record(enc, feats)
    k = layer % (enc.num_layers + 1)  # hidden_states[k] is layer k-1's output
    want = last_token_pool(outputs[k - 1], feats["attention_mask"])
    torch.testing.assert_close(emb, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (emb - last_layer(feats)["embedding"]).abs().amax() > 1e-3


def test_refused_where_it_cannot_work(decoders, tiny_model_dir):
    folder = decoders["qwen3"]
    with pytest.raises(ModelError, match="encoder"):
        Encoder.load(str(tiny_model_dir), pooling="cls", token_prepending=TP)
    with pytest.raises(ModelError, match="causal attention"):
        _load(folder, bidirectional=True, token_prepending=TP)
    with pytest.raises(ModelError, match="last_token"):
        Encoder.load(str(folder), pooling="mean", token_prepending=TP)
    with pytest.raises(ModelError, match="end_layer=9"):
        _load(folder, token_prepending={"start_layer": 1, "end_layer": 9})
    with pytest.raises(ModelError, match="output_layer=7"):
        _load(folder, token_prepending={**TP, "output_layer": 7})
    with pytest.raises(ModelError, match="start_layer"):
        TokenPrepending(start_layer=0)
    enc, plain = _load(folder, token_prepending=TP), _load(folder)
    with pytest.raises(ModelError, match="no placeholder"):
        enc(plain.tokenize(TEXTS))  # e.g. a token-shard batch
    with pytest.raises(ModelError, match="off"):
        plain(enc.tokenize(TEXTS))


def test_config_block_training_refused_and_cli(decoders, tmp_path):
    from codiemb.cli import _token_prepending_arg
    from codiemb.config import TokenPrependingConfig, config_from_dict
    from codiemb.evaluate.cache import model_fingerprint
    from codiemb.train.loop import train

    assert TokenPrependingConfig().template == PROMPT_EOL and not TokenPrependingConfig().enabled
    for bad in ({"start_layer": 3, "end_layer": 3}, {"template": "no slot"}, {"layer": 2}):
        with pytest.raises(ConfigError):
            config_from_dict({"model": {"token_prepending": bad}})
    cfg = config_from_dict({"model": {"name": str(decoders["qwen3"]), "pooling": "last_token",
                                      "token_prepending": {"enabled": True, **TP}},
                            "data": {"datasets": [{"name": "s", "task": "sts", "path": str(tmp_path / "x.jsonl")}]},
                            "tracking": {"enabled": False}})
    with pytest.raises(ConfigError, match="training-free"):
        train(cfg, output_dir=tmp_path / "out")
    block = _token_prepending_arg(["end_layer=3", "output_layer=-2", 'template=A "{text}" B:"'])
    assert (block.enabled, block.end_layer, block.output_layer, block.template) == (True, 3, -2, 'A "{text}" B:"')
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        _token_prepending_arg(["bogus=1"])
    # the evaluation cache tells the two apart
    folder = decoders["qwen3"]
    assert model_fingerprint(_load(folder, append_eos=False)) != model_fingerprint(
        _load(folder, token_prepending=TP))
