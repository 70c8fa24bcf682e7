"""Memory options of a training run: LoRA, bf16 weights, FSDP2 sharding (issue #15 item 4).

- ``model.lora``: adapters through ``peft`` (``model/lora.py``); only they train.
- ``train.param_dtype: bfloat16``: the weights are cast to bf16, so AdamW's ``exp_avg`` and
  ``exp_avg_sq`` (created like the parameters) are bf16 too: half the memory of both.
- ``scaling.strategy: fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer
  layer and then on the loop's step module (the root: embeddings, pooler, pooling head), so each
  rank holds 1/W of the weights, gradients and optimizer state; a layer's weights are all-gathered
  just for its forward and backward, gradients reduce-scattered. Ray 2.60's
  ``prepare_model(parallel_strategy="fsdp")`` is FSDP1 and GPU-only, so this calls
  ``fully_shard`` itself. The losses' exact-gradient ``all_gather`` of embeddings is unchanged
  (it runs on the default process group; FSDP uses its own group, as DDP does).
  Checkpoints and the final model gather full state dicts (``get_model_state_dict`` /
  ``get_optimizer_state_dict`` with ``full_state_dict=True, cpu_offload=True``: a collective on
  every rank, the tensors on rank 0's CPU) and stay safetensors.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from codiemb.errors import ConfigError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prepare_encoder(encoder, cfg) -> None:
    """Apply ``model.lora`` and ``train.param_dtype`` to a freshly loaded encoder, in place."""
    if cfg.model.lora is not None:
        if cfg.scaling.strategy == "fsdp":
            raise ConfigError("model.lora with scaling.strategy=fsdp is not supported; use scaling.strategy=ddp "
                              "(LoRA's frozen base fits where its adapters train)")
        from codiemb.model.lora import add_lora

        add_lora(encoder, cfg.model.lora)
        trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        total = sum(p.numel() for p in encoder.parameters())
        log.info("LoRA: %d of %d parameters train (%.2f%%)", trainable, total, 100.0 * trainable / max(total, 1))
    dtype = _DTYPES[cfg.train.param_dtype]
    if dtype != torch.float32:
        encoder.to(dtype)


def transformer_layers(backbone: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face backbone (BERT/MPNet/RoBERTa ``encoder.layer``,
    Llama/Qwen ``layers``): the largest ``ModuleList`` of the model."""
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ConfigError(f"scaling.strategy=fsdp: no transformer layers found in {type(backbone).__name__}")
    return list(max(lists, key=len))


def shard_fsdp(step: nn.Module, encoder, ctx) -> nn.Module:
    """``fully_shard`` every transformer layer of ``encoder`` and then ``step`` (the root), on a
    process group of its own. Returns ``step`` (now an ``FSDPModule``)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(dist.new_group(backend=dist.get_backend()), ctx.device.type)
    for layer in transformer_layers(encoder.backbone):
        fully_shard(layer, mesh=mesh)
    fully_shard(step, mesh=mesh)
    return step


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


_FULL = dict(full_state_dict=True, cpu_offload=True)


def full_model_state(ctx) -> dict[str, torch.Tensor] | None:
    """The encoder's full state dict (keys as ``encoder.state_dict()``) on rank 0 under FSDP; a
    collective, so every rank calls it. None when the model is not FSDP-sharded."""
    if not is_fsdp(ctx.model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(ctx.model, options=StateDictOptions(**_FULL))
    return {k[len("encoder."):]: v for k, v in full.items()} if ctx.is_main else None


def full_optimizer_state(ctx, optimizer) -> dict | None:
    """The optimizer's full state dict (parameters keyed by name) on rank 0 under FSDP (a collective)."""
    if not is_fsdp(ctx.model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    full = get_optimizer_state_dict(ctx.model, optimizer, options=StateDictOptions(**_FULL))
    return full if ctx.is_main else None


def load_full_state(ctx, optimizer, model_state: dict, optimizer_state: dict | None) -> None:
    """Every rank loads the full (unsharded) states it read from a checkpoint into its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(ctx.model, {f"encoder.{k}": v for k, v in model_state.items()}, options=opts)
    if optimizer_state is not None:  # not strict: a parameter that never had a gradient (BERT's unused pooler) has no state
        set_optimizer_state_dict(ctx.model, optimizer, optimizer_state,
                                 options=StateDictOptions(full_state_dict=True, strict=False))


@contextlib.contextmanager
def unsharded(ctx):
    """Inside: every FSDP module of the step holds its full weights and forwards make no
    collective, so ranks may run different numbers of inference batches (dev evaluation).
    Costs the full model's memory for the duration; a no-op without FSDP."""
    if not is_fsdp(ctx.model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    mods = [m for m in ctx.model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True, recurse=False)
