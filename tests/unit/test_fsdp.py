"""``scaling.strategy: fsdp`` (FSDP2 ``fully_shard``) on 2 gloo ranks equals DDP; its checkpoints resume.

Each rank runs the real ``train()`` three times in one process group: DDP for 3 steps, FSDP for
3 steps, and FSDP stopped after 2 steps (a checkpoint gathered from the shards) then resumed for
the third. Retrieval steps gather embeddings across ranks (the exact-gradient all_gather) and STS
steps gather scores, as in training. Dropout is off, so the runs are deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

WORLD = 2
WORDS = "cat dog man woman child car house tree water fire sun moon red blue green big small".split()


def _tasks():
    from codiemb.train.loop import TaskData

    rng = random.Random(4)
    ret = [{"query": " ".join(rng.sample(WORDS, 3)), "positives": [" ".join(rng.sample(WORDS, 5))],
            "negatives": [" ".join(rng.sample(WORDS, 4))]} for _ in range(16)]
    sts = [{"sentence1": " ".join(rng.sample(WORDS, 4)), "sentence2": " ".join(rng.sample(WORDS, 4)),
            "score": rng.uniform(0, 5)} for _ in range(16)]
    return [TaskData(name="ret", task="retrieval", records=ret, batch_size=4, num_positives=1, num_negatives=1),
            TaskData(name="sts", task="sts", records=sts, batch_size=4, score_range=(0.0, 5.0))]


def _cfg(model_dir: str, strategy: str):
    from codiemb.config import config_from_dict

    return config_from_dict({
        "run": {"name": "fsdp", "seed": 2},
        "model": {"name": model_dir, "max_length": {"query": 12, "passage": 12, "sts": 12}},
        "sampler": {"policy": "round_robin"},
        "loss": {"retrieval": {"temperature": 0.05, "negatives": 1}},
        "train": {"max_steps": 3, "lr": 1e-3, "warmup_ratio": 0.0, "checkpoint_every": 0, "log_every": 1,
                  "grad_clip": 0.05},  # below every step's gradient norm: clipping (over sharded grads) acts
        "scaling": {"num_workers": WORLD, "strategy": strategy},
    })


def _first_grad_norm(model_dir: str) -> float:
    """The gradient norm of step 0 under DDP (what clipping compares with grad_clip)."""
    import random as _random

    from codiemb.model.encoder import Encoder
    from codiemb.train.loop import DistContext, EncoderStep, retrieval_loss, wrap_for_ddp

    cfg = _cfg(model_dir, "ddp")
    enc = Encoder.load(model_dir).train()
    ctx = DistContext(rank=dist.get_rank(), world_size=WORLD)
    ctx.model = wrap_for_ddp(enc, ctx)
    td = _tasks()[0]
    idx = list(range(ctx.rank * 4, ctx.rank * 4 + 4))
    loss, _, _ = retrieval_loss(enc, None, td, cfg, ctx, _random.Random(0), idx=idx)
    loss.backward()
    return float(torch.nn.utils.clip_grad_norm_(enc.parameters(), float("inf")))


def _worker(rank: int, init_file: str, out: str, model_dir: str) -> None:
    from codiemb.train.loop import DistContext, train

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        out_dir = Path(out)
        runs = {}
        for name, strategy, stop in (("ddp", "ddp", None), ("fsdp", "fsdp", None), ("resumed", "fsdp", 2),
                                     ("resumed", "fsdp", None)):
            res = train(_cfg(model_dir, strategy), _tasks(), output_dir=out_dir / name,
                        ctx=DistContext(rank=rank, world_size=WORLD), stop_after=stop)
            runs[name if stop is None else "stopped"] = {"steps": res.steps, "resumed_from": res.resumed_from,
                                                         "grad_sync": res.grad_sync, "losses": res.final_losses}
        runs["unclipped_norm"] = _first_grad_norm(model_dir)
        (out_dir / f"rank{rank}.json").write_text(json.dumps(runs))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_fsdp_equals_ddp_and_resumes_from_gathered_checkpoint(nodrop_model_dir, tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path), str(nodrop_model_dir)), nprocs=WORLD, join=True)
    runs = json.loads((tmp_path / "rank0.json").read_text())
    assert runs["ddp"]["grad_sync"] == "DistributedDataParallel"
    assert runs["fsdp"]["grad_sync"].startswith("FSDP")
    assert runs["unclipped_norm"] > 2 * _cfg(str(nodrop_model_dir), "ddp").train.grad_clip  # so clipping changed the updates
    assert runs["stopped"]["steps"] == 2 and runs["resumed"]["resumed_from"] == 2 and runs["resumed"]["steps"] == 3

    ddp = load_file(str(tmp_path / "ddp" / "model" / "model.safetensors"))
    base = load_file(str(nodrop_model_dir / "model.safetensors"))
    for name in ("fsdp", "resumed"):
        got = load_file(str(tmp_path / name / "model" / "model.safetensors"))
        assert got.keys() == ddp.keys()
        for k in ddp:
            torch.testing.assert_close(got[k], ddp[k], rtol=1e-4, atol=1e-6, msg=f"{name} {k}")
    moved = [k for k in ddp if not torch.allclose(ddp[k], base[k], atol=1e-5)]
    assert len(moved) > 20  # 3 steps at lr 1e-3 moved the weights, so the comparison means something
    # the checkpoint written under FSDP holds full (unsharded) tensors, safetensors only
    step2 = tmp_path / "resumed" / "checkpoints" / "step-000002"
    saved = load_file(str(step2 / "model" / "model.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in base.items()}
    optim = load_file(str(step2 / "optimizer.safetensors"))
    emb = "encoder.backbone.embeddings.word_embeddings.weight"
    assert optim[f"{emb}.exp_avg"].shape == base["embeddings.word_embeddings.weight"].shape
    assert not any(p.suffix in (".pt", ".bin", ".pkl") for p in step2.rglob("*"))
