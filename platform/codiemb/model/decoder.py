"""Decoder LLM embedders (Llama / Qwen style): tokenizer set-up and bidirectional attention.

A decoder embedder (E5-Mistral, arXiv 2401.00368; NV-Embed, arXiv 2405.17428; Qwen3-Embedding;
Llama-Embed-Nemotron) reads the state of the LAST token, so three things must hold for every
tokenization path (training shards, ``Encoder.tokenize``, and ``SentenceTransformer(path)``
loading the saved folder):

- **a pad token**: many decoder tokenizers have none; we use the EOS token (padded positions are
  masked everywhere, so the id only has to exist);
- **EOS appended** to every text (last-token pooling then reads the EOS state, which has seen the
  whole text under causal attention). It is done IN the tokenizer: its post-processor becomes
  ``$A <eos>`` (transformers' ``add_eos_token``), so truncation keeps room for it and the saved
  ``tokenizer.json`` carries it to sentence-transformers unchanged (as the Qwen3-Embedding
  tokenizer does);
- **right padding**: with causal attention and positions 0..L-1 the real tokens' states are then
  exactly those of the unpadded text (left padding shifts rotary positions in a plain forward).

**Bidirectional attention** (NV-Embed, Llama-Embed-Nemotron) is the backbone config's
``is_causal = False``: transformers >= 5.2 builds a bidirectional (padding-only) mask from it in
``masking_utils.create_causal_mask`` and hands ``is_causal=False`` to the attention kernels
(``utils/generic.py``, ``check_model_inputs``); it is saved in ``config.json``, and
sentence-transformers loads it the same way (it warns on older transformers).
"""

from __future__ import annotations

import logging

from torch import nn

from codiemb.errors import ModelError

log = logging.getLogger(__name__)


def is_causal_backbone(backbone: nn.Module) -> bool:
    """True for a decoder: its attention modules are causal (``is_causal``), or its config says
    ``is_causal: false`` (a decoder already switched to bidirectional attention)."""
    if getattr(backbone.config, "is_causal", True) is False:
        return True
    return any(getattr(m, "is_causal", False) is True for m in backbone.modules() if m is not backbone)


def set_bidirectional(backbone: nn.Module, bidirectional: bool) -> None:
    """Switch a decoder backbone's attention between causal and bidirectional (``config.is_causal``)."""
    if not is_causal_backbone(backbone):
        if bidirectional:
            return  # an encoder already attends both ways
        raise ModelError(f"model.bidirectional=false: {backbone.config.model_type!r} is an encoder, not a causal decoder")
    backbone.config.is_causal = not bidirectional


def appends_eos(tokenizer) -> bool:
    """Whether the tokenizer already ends every encoded text with its EOS token."""
    eos = tokenizer.eos_token_id
    return eos is not None and tokenizer("a")["input_ids"][-1:] == [eos]


def prepare_tokenizer(tokenizer, *, pooling: str, append_eos: bool | None = None, decoder: bool | None = None):
    """Give ``tokenizer`` what embedding needs (in place; returns it).

    ``append_eos``: None (auto) appends EOS when ``pooling == "last_token"`` and the tokenizer
    has an EOS token it does not append yet; True requires an EOS token; False leaves the
    post-processor alone. A missing pad token becomes the EOS token (a tokenizer with neither
    is a ModelError). Padding goes right. ``decoder`` (the backbone is causal) only adds to the
    logged reason; the rules hold for any tokenizer (BERT's appends [SEP], and has a pad token).
    """
    want = append_eos if append_eos is not None else (pooling == "last_token" and tokenizer.eos_token_id is not None)
    if want and not appends_eos(tokenizer):
        if tokenizer.eos_token_id is None:
            raise ModelError("model.append_eos=true but the tokenizer has no eos_token")
        if not hasattr(type(tokenizer), "add_eos_token"):
            raise ModelError(f"cannot append EOS with tokenizer {type(tokenizer).__name__} (no add_eos_token)")
        tokenizer.add_eos_token = True
        if not appends_eos(tokenizer):
            raise ModelError(f"tokenizer {type(tokenizer).__name__} did not take add_eos_token")
        log.info("tokenizer: EOS %r appended to every text (%s pooling)", tokenizer.eos_token, pooling)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
        log.info("tokenizer: no pad token; padding with EOS %r", tokenizer.eos_token)
    if tokenizer.padding_side != "right":
        log.info("tokenizer: padding side %s -> right%s", tokenizer.padding_side,
                 " (decoder: exact under causal attention)" if decoder else "")
        tokenizer.padding_side = "right"
    return tokenizer
