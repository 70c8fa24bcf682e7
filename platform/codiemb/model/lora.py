"""LoRA adapters on the encoder's backbone, through ``peft`` (``model.lora`` in the config).

:func:`add_lora` wraps ``encoder.backbone`` in a ``peft`` model: the backbone's weights are frozen
and only the low-rank adapters (and a latent-attention pooling head, which has no pretrained
weights) train. :func:`merged_state_dict` is the backbone's plain state dict with every adapter
folded into its base weight (W + scaling·B·A, peft's ``get_delta_weight``), computed without
touching the live model (``merge_and_unload`` would end training; merge + unmerge would move the
base weights by rounding). ``Encoder.save`` writes that, so a saved folder is an ordinary
sentence-transformers model that loads without ``peft``.

``peft`` is an optional dependency (``pip install 'codiemb[lora]'``).
"""

from __future__ import annotations

from torch import Tensor, nn

from codiemb.errors import ConfigError


def _peft():
    try:
        import peft
    except ImportError:
        raise ConfigError("model.lora needs the package peft: pip install 'codiemb[lora]' (or pip install peft)") from None
    return peft


def is_lora(backbone: nn.Module) -> bool:
    """True when ``backbone`` is a ``peft`` model (without importing peft when it is not installed)."""
    return type(backbone).__module__.startswith("peft.")


def add_lora(encoder, cfg) -> None:
    """Wrap ``encoder.backbone`` with LoRA adapters per ``cfg`` (a ``LoraConfig``), in place."""
    peft = _peft()
    lcfg = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=list(cfg.target_modules) if cfg.target_modules else None)
    try:
        encoder.backbone = peft.get_peft_model(encoder.backbone, lcfg)
    except ValueError as exc:  # e.g. target modules not found, or no default for this model type
        raise ConfigError(f"model.lora: {str(exc).splitlines()[0]}") from None


def merged_state_dict(backbone: nn.Module) -> dict[str, Tensor]:
    """The base model's state dict (its own key names) with the active adapters merged in."""
    from peft.tuners.lora import LoraLayer

    base = backbone.get_base_model()
    deltas: dict[str, Tensor] = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer):
            for adapter in module.active_adapters:
                if adapter in module.lora_A or adapter in getattr(module, "lora_embedding_A", {}):
                    d = module.get_delta_weight(adapter).detach()
                    deltas[name] = deltas[name] + d if name in deltas else d
    out: dict[str, Tensor] = {}
    for key, value in base.state_dict().items():
        if ".lora_" in key:
            continue
        module_name, _, leaf = key.rpartition(".base_layer.")
        if module_name:
            value = value + deltas[module_name].to(value.dtype) if leaf == "weight" and module_name in deltas else value
            key = f"{module_name}.{leaf}"
        out[key] = value.detach()
    return out
