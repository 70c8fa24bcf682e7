"""Pooling heads: token states (B, L, D) + mask (B, L) -> one vector per text (B, D).

- ``mean``: Σ_t m_t h_t / Σ_t m_t (Sentence-BERT, arXiv 1908.10084).
- ``cls``: the first non-padding token (left or right padding).
- ``last_token``: the last non-padding token (left or right padding); decoder embedders
  such as E5-Mistral / NV-Embed read the final position.
- ``latent_attention``: NV-Embed's latent-attention layer (arXiv 2405.17428, §3.2), a trainable module.

Masks are 0/1 (or bool) tensors. For ``mean`` the mask may leave out an instruction prefix
(``pool_mask``), while ``cls``/``last_token`` should be given the plain attention mask.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

POOLING_KINDS = ("mean", "cls", "last_token", "latent_attention")


def mean_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """Masked mean over tokens, accumulated in float32 and returned in ``hidden``'s dtype."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * m).sum(dim=1, dtype=torch.float32)
    count = m.sum(dim=1, dtype=torch.float32).clamp(min=1e-9)
    return (summed / count).to(hidden.dtype)


def cls_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """State of the first token whose mask is 1 (index 0 under right padding)."""
    first = mask.to(torch.int32).argmax(dim=1)
    return hidden[torch.arange(hidden.size(0), device=hidden.device), first]


def last_token_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """State of the last token whose mask is 1; works for left and right padding."""
    seq_len = mask.size(1)
    positions = torch.arange(seq_len, device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values
    last = last.clamp(min=0)  # an all-zero mask row falls back to position 0
    return hidden[torch.arange(hidden.size(0), device=hidden.device), last]


def pool(hidden: Tensor, mask: Tensor, kind: str) -> Tensor:
    """Pool token states with a parameter-free method: ``mean``, ``cls`` or ``last_token``."""
    if kind == "mean":
        return mean_pool(hidden, mask)
    if kind == "cls":
        return cls_pool(hidden, mask)
    if kind == "last_token":
        return last_token_pool(hidden, mask)
    if kind == "latent_attention":
        raise ValueError("latent_attention pooling has weights: use LatentAttentionPooling")
    raise ValueError(f"unknown pooling {kind!r}; choose from {', '.join(POOLING_KINDS)}")


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent-attention pooling (Lee et al. 2024, arXiv 2405.17428, §3.2).

    The token states Q (B, L, d) attend to a trainable latent array K = V = A (r, d)::

        O   = Q + MHA(LN(Q), LN(A), LN(A))          # cross-attention, queries are the tokens
        Y   = O + W2 · GELU(W1 · LN(O))             # MLP
        out = Σ_t m_t Y_t / Σ_t m_t                 # mean pool over the (pool) mask

    The paper uses r = 512 latents, 8 heads and an MLP of two linear layers with GELU. The output
    projection of the attention and the last MLP layer start at zero, so a freshly added head
    returns exactly mean pooling and training departs from the backbone's own embedding.
    """

    def __init__(self, hidden_dim: int, num_latents: int = 512, num_heads: int = 8, mlp_ratio: int = 4) -> None:
        super().__init__()
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim {hidden_dim} is not divisible by num_heads {num_heads}")
        self.hidden_dim, self.num_latents, self.num_heads, self.mlp_ratio = hidden_dim, num_latents, num_heads, mlp_ratio
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_dim) * hidden_dim**-0.5)
        self.norm_q = nn.LayerNorm(hidden_dim)
        self.norm_kv = nn.LayerNorm(hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, num_heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(hidden_dim)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_dim, mlp_ratio * hidden_dim), nn.GELU(), nn.Linear(mlp_ratio * hidden_dim, hidden_dim)
        )
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def get_config(self) -> dict:
        return {"hidden_dim": self.hidden_dim, "num_latents": self.num_latents,
                "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio}

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        kv = self.norm_kv(self.latents).unsqueeze(0).expand(hidden.size(0), -1, -1).to(hidden.dtype)
        attended, _ = self.attn(self.norm_q(hidden), kv, kv, need_weights=False)
        x = hidden + attended
        x = x + self.mlp(self.norm_mlp(x))
        return mean_pool(x, mask)
