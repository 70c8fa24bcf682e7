"""Training checkpoints: safetensors only, written atomically, with a sha256 manifest.

A checkpoint folder ``step-000200/`` holds

- ``model/``           the encoder as a sentence-transformers folder (``Encoder.save``)
- ``optimizer.safetensors`` + ``optimizer.json``  AdamW tensors, and everything else of its state
- ``trainer.json``     step, scheduler, sampler and Python/NumPy RNG state, extra user state
- ``rng.safetensors``  torch CPU (and CUDA) RNG states
- ``trainable.safetensors``  with LoRA only: the parameters that train (adapters), by name; the
  frozen base is the run's ``model.name``, so resume loads these into it (``model/`` is merged)
- ``manifest.json``    sha256 and size of every file above

It is written to ``.tmp-step-000200-<pid>`` next to the final folder, fsynced, then renamed, so a
crash never leaves a half checkpoint under the final name. Nothing is ever unpickled on load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


# --------------------------------------------------------------------------- optimizer state
def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    meta_state: dict[str, dict] = {}
    for pid, pstate in state["state"].items():
        entry = {}
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
                entry[key] = {"tensor": True}
            else:
                entry[key] = {"value": value}
        meta_state[str(pid)] = entry
    return tensors, {"state": meta_state, "param_groups": state["param_groups"]}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for pid, entry in meta["state"].items():
        pstate = {}
        for key, spec in entry.items():
            pstate[key] = tensors[f"{pid}.{key}"] if spec.get("tensor") else spec["value"]
        state[int(pid) if pid.isdigit() else pid] = pstate  # names: FSDP's full optimizer state
    return {"state": state, "param_groups": meta["param_groups"]}


# --------------------------------------------------------------------------- rng
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("torch_cuda_"))]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))


# --------------------------------------------------------------------------- save / load
def save_checkpoint(
    root: str | Path,
    step: int,
    encoder,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    trainer_state: dict[str, Any],
    keep: int | None = None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
) -> Path:
    """Write ``root/step-XXXXXX`` atomically and return its path; prune to the newest ``keep``.

    ``model_state`` / ``optimizer_state``: full states gathered from FSDP shards, written instead
    of ``encoder``'s live tensors and ``optimizer.state_dict()``."""
    from codiemb.model.lora import is_lora

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    encoder.save(tmp / "model", state_dict=model_state)
    if is_lora(encoder.backbone):
        save_file({n: p.detach().cpu().contiguous() for n, p in encoder.named_parameters() if p.requires_grad},
                  str(tmp / "trainable.safetensors"))
    if optimizer is not None:
        tensors, meta = _flatten_optimizer(optimizer_state if optimizer_state is not None else optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    rng_tensors, rng_meta = rng_state()
    save_file(rng_tensors, str(tmp / "rng.safetensors"))
    state = dict(trainer_state)
    state["step"] = step
    state["rng"] = rng_meta
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    (tmp / "trainer.json").write_text(json.dumps(state, default=_json_default))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {
        "step": step,
        "files": {str(p.relative_to(tmp)): {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in files},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    for p in files + [tmp / MANIFEST]:
        with open(p, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    log.info("checkpoint written: %s", final)
    if keep:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / MANIFEST).is_file())


def verify_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    for rel, info in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            log.warning("checkpoint %s: %s does not match its manifest", path, rel)
            return False
    return True


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint whose files match their manifest (a corrupt one is skipped)."""
    for ckpt in reversed(list_checkpoints(root)):
        if verify_checkpoint(ckpt):
            return ckpt
    return None


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / "trainer.json").read_text())


def restore_checkpoint(path: str | Path, encoder, optimizer=None, scheduler=None, fsdp=None) -> dict[str, Any]:
    """Load weights, optimizer, scheduler and RNG state in place; return the trainer state.

    ``fsdp``: the loop's ``DistContext`` when its model is FSDP-sharded; every rank then loads the
    full states and keeps its shards (``train/memory.load_full_state``)."""
    from codiemb.model.lora import is_lora

    path = Path(path)
    optim_state = None
    if optimizer is not None and (path / "optimizer.safetensors").is_file():
        tensors = load_file(str(path / "optimizer.safetensors"))
        meta = json.loads((path / "optimizer.json").read_text())
        optim_state = _unflatten_optimizer(tensors, meta)
    if fsdp is not None:
        from codiemb.model.encoder import Encoder
        from codiemb.train import memory

        memory.load_full_state(fsdp, optimizer, Encoder.load(str(path / "model"), device="cpu").state_dict(), optim_state)
    else:
        if is_lora(encoder.backbone):
            _load_trainable(encoder, path / "trainable.safetensors")
        else:
            _load_model_weights(encoder, path / "model")
        if optim_state is not None:
            optimizer.load_state_dict(optim_state)
    state = load_trainer_state(path)
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


def _load_trainable(encoder, file: Path) -> None:
    """LoRA: the trained parameters (adapters) by name into ``encoder``; every one must be there."""
    tensors = load_file(str(file))
    want = {n for n, p in encoder.named_parameters() if p.requires_grad}
    if set(tensors) != want:
        raise ValueError(f"{file}: holds {len(tensors)} tensors, the model trains {len(want)} "
                         f"(different LoRA config?): e.g. {sorted(set(tensors) ^ want)[:3]}")
    params = dict(encoder.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _load_model_weights(encoder, folder: Path) -> None:
    """Copy the saved encoder's parameters (backbone and pooling head) into ``encoder`` in place."""
    from codiemb.model.encoder import Encoder

    saved = Encoder.load(str(folder), device="cpu")
    encoder.load_state_dict(saved.state_dict(), strict=True)
