"""Token Prepending for causal decoder embedders (Fu et al. 2024, arXiv 2412.11556; training-free).

Under causal attention the early tokens of a sentence never see its later tokens. Token
Prepending (TP) puts one placeholder token ``<PST>`` in front of the sentence and, at the INPUT of
the early decoder layers, replaces the placeholder's state by the last token's state of the layer
before, so every later token can attend to a summary of the whole sentence::

    h^0 = embed(x),        x = [BOS] <PST> template(text)
    for l = 0 .. N-1:
        if start_layer <= l < end_layer:   h^l[p] <- h^l[last]      (h^l = output of layer l-1)
        h^{l+1} = layer_l(h^l)
    embedding = h^{output_layer}[last]                             (last-token pooling)

``p`` is the placeholder's position (1 when the tokenizer adds a BOS token, else 0) and ``last``
each row's last non-padding position (right padding: rows differ). Layer indices are 0-based HF
decoder layers with the paper's exclusive end (the released code: ``tp_starting_index <= index <
tp_exiting_index``; defaults 1 and 7 for Llama-2-7B). ``output_layer`` indexes the backbone's
``hidden_states`` like ``Encoder.forward``'s ``layers``: 0 the embeddings, N the last layer (after
the final norm), negative from the end; None is the last layer. The template is PromptEOL's
``This sentence : "{text}" means in one word:"`` by default (the paper's main prompt), and EOS is
not appended by default (the last token is the template's closing quote, as in the paper).

The placeholder: the paper adds a new token ``<PST>`` and resizes the embedding matrix. Here the
vocabulary is left alone (a resized matrix would no longer match the base weights that merging
and checkpoints compare against): with ``placeholder: null`` (the default) the placeholder's
input id is a stand-in (the pad id) and a forward hook on the input embeddings gives that position
the MEAN of the embedding matrix (what a new row gets under mean resizing); a string names an
existing token of the vocabulary (as ``convert_tokens_to_ids`` names it, e.g. ``<PST>`` in a
model that has one) whose own embedding is used. With ``start_layer >= 1``
this vector only enters layer 0; from ``start_layer`` on the state is overwritten anyway.

It is implemented with hooks registered for one forward (``TokenPrepender.applied``): a forward
pre-hook on each decoder layer in the range and a forward hook on the input embeddings; no model
file is forked. Where it cannot hold, it raises ``ModelError``: an encoder (bidirectional by
design) or a decoder switched to bidirectional attention, pooling other than ``last_token``, a
layer range outside the model, a backward pass through gradient checkpointing (the recompute
would run without the hooks). The packed (unpadded) training forward never sees it:
``train()`` refuses ``model.token_prepending`` (the method is training-free; the token shards
hold neither template nor placeholder).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codiemb.errors import ModelError

PROMPT_EOL = 'This sentence : "{text}" means in one word:"'
PLACEHOLDER_KEY = "placeholder_position"  # the feature Encoder.tokenize adds: (B,) placeholder index per row


@dataclass(frozen=True)
class TokenPrepending:
    """Settings (``model.token_prepending`` minus ``enabled``); see the module docstring."""

    start_layer: int = 1
    end_layer: int = 7
    template: str | None = PROMPT_EOL
    output_layer: int | None = None
    placeholder: str | None = None

    def __post_init__(self) -> None:
        if self.start_layer < 1:
            raise ModelError(f"token_prepending.start_layer={self.start_layer}: must be >= 1 "
                             "(layer 0's input is the embedding output; there is no previous layer)")
        if self.end_layer <= self.start_layer:
            raise ModelError(f"token_prepending: end_layer ({self.end_layer}) must exceed start_layer "
                             f"({self.start_layer}); the range is start_layer <= l < end_layer")
        if self.template is not None and self.template.count("{text}") != 1:
            raise ModelError(f"token_prepending.template must hold '{{text}}' exactly once: {self.template!r}")

    @classmethod
    def from_config(cls, cfg) -> "TokenPrepending | None":
        """From a ``TokenPrependingConfig`` / dict / ``TokenPrepending``; None when not enabled."""
        if cfg is None or isinstance(cfg, cls):
            return cfg
        d = dict(cfg) if isinstance(cfg, dict) else cfg.model_dump()
        if not d.pop("enabled", True):
            return None
        return cls(**d)

    def apply_template(self, text: str) -> str:
        return text if self.template is None else self.template.replace("{text}", text)


def decoder_layers(backbone: nn.Module) -> nn.ModuleList:
    """The backbone's list of decoder layers (``layers`` of a Llama/Qwen model, also under PEFT)."""
    n = int(getattr(backbone.config, "num_hidden_layers", 0) or 0)
    for name, module in backbone.named_modules():
        if isinstance(module, nn.ModuleList) and name.split(".")[-1] == "layers" and len(module) == n:
            return module
    raise ModelError(f"token_prepending: no list of {n} decoder layers found in {type(backbone).__name__}")


class TokenPrepender:
    """TP bound to one backbone + tokenizer: inserts the placeholder and hooks one forward."""

    def __init__(self, settings: TokenPrepending, backbone: nn.Module, tokenizer, *, pooling: str,
                 is_decoder: bool) -> None:
        if not is_decoder:
            raise ModelError("model.token_prepending needs a causal decoder (Llama / Qwen style); "
                             f"{backbone.config.model_type!r} is an encoder, whose tokens already see the whole text")
        if getattr(backbone.config, "is_causal", True) is False:
            raise ModelError("model.token_prepending needs causal attention; this decoder is bidirectional "
                             "(model.bidirectional / config is_causal: false), where every token already sees the text")
        if pooling != "last_token":
            raise ModelError(f"model.token_prepending reads the last token: set model.pooling: last_token (not {pooling!r})")
        self.settings = settings
        self.backbone = backbone
        self.layers = decoder_layers(backbone)
        n = len(self.layers)
        if settings.end_layer > n:
            raise ModelError(f"token_prepending.end_layer={settings.end_layer} > the model's {n} layers "
                             "(the range is start_layer <= l < end_layer, 0-based)")
        out = settings.output_layer
        if out is not None and not -(n + 1) <= out <= n:
            raise ModelError(f"token_prepending.output_layer={out}: the model has hidden states 0..{n}")
        self.embeddings = backbone.get_input_embeddings()
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token_id
        self.position = 1 if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else 0
        self.bos_id = bos if self.position else None
        if settings.placeholder is None:
            self.token_id, self.mean_embedding = tokenizer.pad_token_id, True  # a stand-in id, overwritten
        else:
            tid = tokenizer.convert_tokens_to_ids(settings.placeholder)
            if tid is None or (tid == tokenizer.unk_token_id and settings.placeholder != tokenizer.unk_token):
                raise ModelError(f"token_prepending.placeholder {settings.placeholder!r} is not a token of this "
                                 "tokenizer's vocabulary (or null: a stand-in with the mean embedding)")
            self.token_id, self.mean_embedding = tid, False
        if self.token_id is None:
            raise ModelError("token_prepending: the tokenizer has no pad token to stand in for the placeholder")

    # ------------------------------------------------------------------ inputs
    def insert(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Insert the placeholder column at ``self.position`` (after BOS, else first); it is
        attended to (attention mask 1) and never pooled (pool mask 0). Adds ``PLACEHOLDER_KEY``."""
        ids, p = features["input_ids"], self.position
        if p and not bool((ids[:, 0] == self.bos_id).all()):
            raise ModelError("token_prepending: a row does not start with the tokenizer's BOS token")
        b = ids.size(0)
        out = {"input_ids": torch.cat([ids[:, :p], ids.new_full((b, 1), self.token_id), ids[:, p:]], dim=1)}
        for key, fill in (("attention_mask", 1), ("pool_mask", 0)):
            if key in features:
                m = features[key]
                out[key] = torch.cat([m[:, :p], m.new_full((b, 1), fill), m[:, p:]], dim=1)
        out[PLACEHOLDER_KEY] = torch.full((b,), p, dtype=torch.long)
        return out

    # ------------------------------------------------------------------ forward
    @contextmanager
    def applied(self, placeholder: Tensor, attention_mask: Tensor):
        """Hooks for one forward: ``placeholder`` (B,) positions, ``attention_mask`` (B, L) right-padded."""
        if torch.is_grad_enabled() and self._checkpointing():
            raise ModelError("token_prepending with gradient checkpointing and gradients on: the backward "
                             "recompute would run without the hooks")
        rows = torch.arange(attention_mask.size(0), device=attention_mask.device)
        pst = placeholder.to(attention_mask.device)
        positions = torch.arange(attention_mask.size(1), device=attention_mask.device).expand_as(attention_mask)
        last = torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
        if bool((last <= pst).any()):
            raise ModelError("token_prepending: a row has no token after the placeholder")

        def before_layer(module, args, kwargs):
            if args:
                h, args = args[0], args[1:]
            else:
                h = kwargs.pop("hidden_states")
            h = h.clone()  # the previous layer's output stays as it was (hidden_states[l] records it)
            h[rows, pst] = h[rows, last]
            return (h, *args), kwargs

        def after_embeddings(module, args, output):
            out = output.clone()
            out[rows, pst] = module.weight.detach().mean(dim=0).to(out.dtype)
            return out

        handles = [self.layers[l].register_forward_pre_hook(before_layer, with_kwargs=True)
                   for l in range(self.settings.start_layer, self.settings.end_layer)]
        if self.mean_embedding:
            handles.append(self.embeddings.register_forward_hook(after_embeddings))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _checkpointing(self) -> bool:
        return bool(getattr(self.backbone, "is_gradient_checkpointing", False)) or any(
            getattr(m, "gradient_checkpointing", False) is True for m in self.backbone.modules())
