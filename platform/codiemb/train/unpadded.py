"""Unpadded ("packed", variable-length) forward for BERT encoders: no compute on padding.

A batch of B texts with lengths L_1..L_B becomes ONE row of T = Σ L_i tokens. Every linear
layer, LayerNorm and GELU then runs on T tokens instead of B·max(L) (SciFact passages: ~2x
fewer), and attention is block-diagonal: token t of text i attends only to the tokens of text i,
given by the cumulative lengths ``cu_seqlens = [0, L_1, L_1+L_2, ..., T]`` (the FlashAttention-2
varlen interface, Dao 2023, arXiv 2307.08691). Positions restart at 0 for every text, so the
result equals the padded forward token for token (``tests/unit/test_benchmarks_smoke.py``).

Attention backends, first available wins (``backend="auto"``):
``flash_attn.flash_attn_varlen_func`` (the flash-attn package; CUDA, fp16/bf16; attention dropout
supported), ``torch.nn.attention.varlen.varlen_attn`` (torch >= 2.10, CUDA; no attention dropout),
``batched``: the texts grouped by length (:func:`length_groups`), each group's packed q/k/v
scattered into a zero-padded (n, H, L, d) view, one scaled_dot_product_attention call per group
with a key-padding mask, and the valid rows gathered back (any device; the CPU default: the linear
layers, LayerNorms and GELUs still run on T tokens only), and
``reference``: scaled_dot_product_attention per text (any device; for tests). ``batched`` exists
because on CPU the per-text loop was 45 % of the forward (a py-spy profile, BENCHMARKS
"Quickstart pipeline"): B small kernel calls and their backward instead of one.

The module reads the weights of a Hugging Face ``BertModel`` (``embeddings``, ``encoder.layer``):
training it trains that backbone, and the backbone still saves and loads as usual. The pooler
is not run (mean pooling does not use it). :func:`unsupported_reason` says which backbones it
computes exactly (``model_type == "bert"`` encoders with absolute positions); RoBERTa-style
models, whose positions start after the padding index, are refused rather than silently wrong.

The training loop's retrieval step runs through here (``train.retrieval_forward``, see
:func:`codiemb.train.loop.retrieval_loss`); the dropout modules are the backbone's own and follow
its ``train()``/``eval()`` mode.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class Packed:
    """A batch without padding: ``input_ids``/``position_ids`` (T,), ``seq_ids`` (T,) the text of
    each token, ``cu_seqlens`` (B+1,) int32, ``lengths`` (B,), ``max_len``."""

    input_ids: Tensor
    position_ids: Tensor
    seq_ids: Tensor
    cu_seqlens: Tensor
    lengths: Tensor
    max_len: int

    @property
    def batch_size(self) -> int:
        return int(self.lengths.numel())

    def to(self, device, non_blocking: bool = True) -> "Packed":
        return Packed(*(t.to(device, non_blocking=non_blocking) for t in
                        (self.input_ids, self.position_ids, self.seq_ids, self.cu_seqlens, self.lengths)),
                      self.max_len)


def pack_lists(seqs) -> Packed:
    """Pack pre-tokenized id sequences (lists or 1-D numpy arrays; no padding is ever built)."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    if len(seqs) and all(isinstance(s, np.ndarray) for s in seqs):
        ids = torch.from_numpy(np.concatenate(seqs).astype(np.int64, copy=False))
    else:
        ids = torch.tensor([int(t) for s in seqs for t in s], dtype=torch.int64)
    return _packed(ids, lengths)


def pack_padded(features: dict[str, Tensor]) -> Packed:
    """Pack a right-padded batch ``{"input_ids", "attention_mask"}``."""
    mask = features["attention_mask"].bool()
    return _packed(features["input_ids"][mask], mask.sum(dim=1).to(torch.int64))


def _packed(ids: Tensor, lengths: Tensor) -> Packed:
    if lengths.numel() == 0 or int(lengths.min()) < 1:
        raise ValueError("every text needs at least one token")
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    seq_ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
    starts = cu[:-1].to(torch.int64)[seq_ids]
    positions = torch.arange(ids.numel(), dtype=torch.int64) - starts
    return Packed(ids, positions, seq_ids, cu, lengths, int(lengths.max()))


@functools.lru_cache(maxsize=None)
def _available_backends() -> tuple[str, ...]:
    out = []
    try:
        import flash_attn  # noqa: F401

        out.append("flash_attn")
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401

        out.append("torch_varlen")
    except Exception:  # noqa: BLE001
        pass
    out += ["batched", "reference"]
    return tuple(out)


def available_backends() -> list[str]:
    """Varlen attention backends importable here, best first (probed once per process: a failed
    import is not cached by Python, and the training loop asks every step)."""
    return list(_available_backends())


CPU_BACKEND = "batched"  # what "auto" runs off CUDA (benchmarks/throughput.py --ours-varlen sets it to compare)


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    if device.type == "cuda":
        for b in available_backends():
            if b not in ("batched", "reference"):
                return b
        return "reference"
    return CPU_BACKEND


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, *, backend: str,
                     dropout_p: float = 0.0) -> Tensor:
    """Block-diagonal softmax(q kᵀ/√d) v over packed (T, H, d) tensors; returns (T, H, d)."""
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, dropout_p=dropout_p, causal=False)
    if backend == "torch_varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu, cu, max_len, max_len)
    if backend == "batched":
        return _batched_attention(q, k, v, cu, max_len, dropout_p)
    if backend == "reference":
        outs = []
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            qi, ki, vi = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, L, d)
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, dropout_p=dropout_p)[0].transpose(0, 1))
        return torch.cat(outs)
    raise ValueError(f"unknown varlen attention backend {backend!r}")


def length_groups(lengths: list[int], slack: float = 1.25) -> list[list[int]]:
    """Texts grouped by length for padded attention: indices sorted by length, a group grows while
    padding it to its longest text costs at most ``slack`` x the attention of its texts unpadded
    (n * max_len^2 <= slack * sum L_i^2), so a batch of short queries and long passages is two
    or a few groups, not one padded to the longest passage."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    cost = 0
    for i in order:
        L = lengths[i]
        if groups and (len(groups[-1]) + 1) * L * L <= slack * (cost + L * L):
            groups[-1].append(i)
            cost += L * L
        else:
            groups.append([i])
            cost = L * L
    return groups


def _batched_attention(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, dropout_p: float) -> Tensor:
    """One SDPA call per group of similar-length texts (:func:`length_groups`) over a padded
    (n, H, L_group, d) view of packed (T, H, d) q/k/v.

    Padded key slots are masked out, so each real query row sees exactly its own text's keys (the
    same softmax as the per-text loop); padded query rows are computed and dropped by the gather.
    A group whose texts all have one length needs no mask.
    """
    T, H, d = q.shape
    dev = q.device
    bounds = cu.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    outs, tokens = [], []
    for group in length_groups(lengths):
        lens = torch.tensor([lengths[i] for i in group], dtype=torch.int64)
        starts = torch.tensor([bounds[i] for i in group], dtype=torch.int64)
        n, L = len(group), int(lens.max())
        first = torch.cumsum(lens, 0) - lens  # each text's first row among the group's tokens
        pos = torch.arange(int(lens.sum())) - torch.repeat_interleave(first, lens)
        tok = (torch.repeat_interleave(starts, lens) + pos).to(dev)  # rows in the packed tensors
        slot = (torch.repeat_interleave(torch.arange(n), lens) * L + pos).to(dev)  # rows in the padded view

        def padded(t: Tensor) -> Tensor:
            return t.new_zeros(n * L, H, d).index_copy(0, slot, t.index_select(0, tok)).view(n, L, H, d).transpose(1, 2)

        mask = None
        if int(lens.min()) < L:
            mask = (torch.arange(L).unsqueeze(0) < lens.unsqueeze(1)).to(dev)[:, None, None, :]
        o = F.scaled_dot_product_attention(padded(q), padded(k), padded(v), attn_mask=mask, dropout_p=dropout_p)
        outs.append(o.transpose(1, 2).reshape(n * L, H, d).index_select(0, slot))
        tokens.append(tok)
    return torch.cat(outs).index_select(0, torch.argsort(torch.cat(tokens)))


def unsupported_reason(backbone: nn.Module) -> str | None:
    """Why :class:`UnpaddedBert` cannot reproduce ``backbone``'s padded forward (None: it can).

    Supported: Hugging Face ``BertModel`` encoders (``model_type`` "bert", e.g. all-MiniLM-L6-v2,
    BERT-base) with absolute position embeddings, not used as a decoder.
    """
    cfg = getattr(backbone, "config", None)
    model_type = getattr(cfg, "model_type", None)
    if model_type != "bert":
        return f"backbone model_type {model_type!r} is not BERT (the unpadded forward supports model_type 'bert')"
    if not (hasattr(backbone, "embeddings") and hasattr(backbone, "encoder") and hasattr(backbone.encoder, "layer")):
        return "backbone lacks embeddings / encoder.layer"
    emb = backbone.embeddings
    if not all(hasattr(emb, a) for a in ("word_embeddings", "position_embeddings", "token_type_embeddings")):
        return "backbone embeddings lack word/position/token-type tables"
    if getattr(cfg, "position_embedding_type", "absolute") not in (None, "absolute"):
        return f"position_embedding_type {cfg.position_embedding_type!r} (only absolute is supported)"
    if getattr(cfg, "is_decoder", False):
        return "backbone is configured as a decoder (causal attention)"
    return None


class UnpaddedBert(nn.Module):
    """Packed forward over a Hugging Face ``BertModel``'s own modules: ``Packed`` -> (T, D) token states.

    ``gradient_checkpointing`` recomputes each layer in backward (``torch.utils.checkpoint``,
    non-reentrant; dropout masks are replayed from the saved RNG state). Dropout (hidden and
    attention) is active when the backbone is in training mode; the ``torch_varlen`` backend has
    no attention dropout (hidden dropout still applies).
    """

    def __init__(self, backbone: nn.Module, backend: str = "auto", *, gradient_checkpointing: bool = False):
        super().__init__()
        why = unsupported_reason(backbone)
        if why:
            raise ValueError(f"UnpaddedBert: {why}")
        self.backbone = backbone
        cfg = backbone.config
        self.num_heads = int(cfg.num_attention_heads)
        self.head_dim = int(cfg.hidden_size) // self.num_heads
        self.backend = backend
        self.gradient_checkpointing = gradient_checkpointing

    def _attn_dropout(self, layer) -> float:
        drop = getattr(layer.attention.self, "dropout", None)
        if isinstance(drop, nn.Dropout):
            return float(drop.p)
        return float(getattr(self.backbone.config, "attention_probs_dropout_prob", 0.0))

    def _layer(self, layer, x: Tensor, packed: Packed, backend: str) -> Tensor:
        T = x.shape[0]
        sa = layer.attention.self
        w = torch.cat([sa.query.weight, sa.key.weight, sa.value.weight])
        b = torch.cat([sa.query.bias, sa.key.bias, sa.value.bias])
        q, k, v = F.linear(x, w, b).view(T, 3, self.num_heads, self.head_dim).unbind(1)
        if q.dtype == torch.float32 and backend not in ("batched", "reference"):  # flash kernels take fp16/bf16
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        drop = self._attn_dropout(layer) if self.backbone.training and backend != "torch_varlen" else 0.0
        a = varlen_attention(q, k, v, packed.cu_seqlens, packed.max_len, backend=backend, dropout_p=drop)
        a = a.reshape(T, -1).to(x.dtype)
        ao = layer.attention.output
        x = ao.LayerNorm(ao.dropout(ao.dense(a)) + x)
        h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
        o = layer.output
        return o.LayerNorm(o.dropout(o.dense(h)) + x)

    def forward(self, packed: Packed) -> Tensor:
        emb = self.backbone.embeddings
        backend = resolve_backend(self.backend, packed.input_ids.device)
        x = emb.word_embeddings(packed.input_ids) + emb.position_embeddings(packed.position_ids) \
            + emb.token_type_embeddings.weight[0]
        x = emb.dropout(emb.LayerNorm(x))
        checkpoint = self.gradient_checkpointing and self.backbone.training and torch.is_grad_enabled()
        for layer in self.backbone.encoder.layer:
            if checkpoint:
                from torch.utils.checkpoint import checkpoint as ckpt

                x = ckpt(self._layer, layer, x, packed, backend, use_reentrant=False)
            else:
                x = self._layer(layer, x, packed, backend)
        return x


def mean_pool_packed(states: Tensor, packed: Packed) -> Tensor:
    """(T, D) token states -> (B, D) mean per text, summed in float32 (as ``pooling.mean_pool``)."""
    sums = torch.zeros(packed.batch_size, states.shape[-1], dtype=torch.float32, device=states.device)
    sums.index_add_(0, packed.seq_ids, states.float())
    return (sums / packed.lengths.to(states.device, torch.float32).unsqueeze(1)).to(states.dtype)
