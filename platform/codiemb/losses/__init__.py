"""Losses: plain functions on tensors, one loss per function, formula + citation in each docstring."""

from codiemb.losses.distributed import gather_with_grad, world_info
from codiemb.losses.ir import info_nce
from codiemb.losses.matryoshka import layer_kl, matryoshka, matryoshka_2d
from codiemb.losses.sts import cosent, cosine, mid_nce, pearson_loss, pro, rank_kl, sts_loss
from codiemb.losses.unsupervised import debcse_loss, shuffled_group_whitening, simcse_loss, whitenedcse_loss

__all__ = [
    "cosent",
    "cosine",
    "debcse_loss",
    "gather_with_grad",
    "info_nce",
    "layer_kl",
    "matryoshka",
    "matryoshka_2d",
    "mid_nce",
    "pearson_loss",
    "pro",
    "rank_kl",
    "shuffled_group_whitening",
    "simcse_loss",
    "sts_loss",
    "whitenedcse_loss",
    "world_info",
]
