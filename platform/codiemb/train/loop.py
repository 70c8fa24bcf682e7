"""The training loop: plain torch, top to bottom, no Ray (DESIGN §2, §4).

One process runs it with ``codiemb train CONFIG --local``; each Ray Train worker runs the same
function with its rank and world size (``train/ray_trainer.py``). Every optimizer step is ONE task
on ALL ranks (``TaskBatchSampler``); retrieval steps use multi-positive InfoNCE over the global
batch, STS steps the order-aware composite, unsupervised steps (single texts) SimCSE, WhitenedCSE
or DebCSE (``loss.unsupervised``, :func:`unsupervised_loss_step`). Gradients are averaged over ranks by PyTorch DDP
(``EncoderStep``; ``ray.train.torch.prepare_model`` on Ray), overlapped with the backward pass.

Data: every dataset is tokenized ONCE into token shards (``data/shards.py``, built by
``data/build.py``; by Ray Data on a cluster) and the loop reads its rows by id, memory-mapped:
nothing here holds a dataset in Python memory, and no step tokenizes. Retrieval rows fill a
fixed number of positive and negative slots (the same on every rank); empty slots are masked.

Retrieval steps run the encoder one of two ways (``train.retrieval_forward``, see
:func:`retrieval_forward`): **unpadded** (the default wherever it is possible): a step packs its
queries and passages into one sequence for ``unpadded.UnpaddedBert``, which reads the
backbone's own weights (no compute on padding; gradients, checkpoints and DDP's gradient sync are
the backbone's as before); **padded**: the ids padded to the batch maximum and the Hugging Face
forward (instruction prefixes, non-BERT backbones, non-mean pooling). Both give the same loss and
gradients. STS steps are always padded (short sentences; MidNCE reads a middle layer).
``benchmarks/throughput.py`` times :func:`retrieval_loss` itself.
With ``train.mini_batch_size`` (GradCache, ``train/gradcache.py``) every forward of a step runs in
chunks of that many texts, and the step's backward ends with ``ctx.gradcache.backward()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from codiemb.config import Config
from codiemb.errors import ConfigError, DataError
from codiemb.evaluate.dev import evaluate_dev  # noqa: F401  (dev scores during and after training)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- data handed to the loop
@dataclass
class TaskData:
    """One training source: its token shards (``store``, read by row id) and its batch geometry.

    ``records`` (small in-memory sets: tests, benchmarks) is tokenized into an in-memory store on
    first use. ``num_positives`` / ``num_negatives`` are the dataset's fixed slot counts, the same
    on every rank; rows with fewer texts leave slots empty (masked in the loss).
    """

    name: str
    task: str  # "retrieval" | "sts" | "unsupervised"
    records: list[dict] | None = None
    batch_size: int = 32
    score_range: tuple[float, float] = (0.0, 5.0)
    instruction: str | dict | None = None  # the query's, or {query, passage, sts} (data.build.dataset_instructions)
    num_positives: int = 1
    num_negatives: int = 0
    store: Any = None  # codiemb.data.shards.ShardStore (at most the dataset's max_rows rows: part of its key)
    teachers: list = field(default_factory=list)  # [(data.teacher.TeacherScores, weight)]: loss.distill
    # per-dataset state (in-memory store for records, decisions, the unpadded module); not data
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.store) if self.store is not None else len(self.records or [])


def load_task_data(cfg: Config, quarantine_dir: str | Path | None = None, *, use_ray: bool = False
                   ) -> tuple[list[TaskData], dict[str, dict]]:
    """Build (or reuse) every configured dataset's token shards and open them (``data.build``).

    Without Ray the shards are built by the plain reader in this process; ``use_ray`` builds them
    with Ray Data on the cluster. Both give the same shard set (same key, same rows, same order).
    """
    from codiemb.data.build import build_shards, shards_root, spec_for

    tasks: list[TaskData] = []
    counts: dict[str, dict] = {}
    root = shards_root(cfg)
    for ds in cfg.data.datasets:
        qpath = None
        if cfg.data.on_bad_rows == "quarantine":
            qdir = Path(quarantine_dir or ".")
            qdir.mkdir(parents=True, exist_ok=True)
            qpath = str(qdir / f"quarantine-{ds.name}.jsonl")
        res = build_shards(spec_for(cfg, ds), root, use_ray=use_ray, quarantine_path=qpath,
                           concurrency=cfg.data.build_concurrency,
                           ray_min_bytes=int(cfg.data.ray_build_min_mb * 2**20))
        counts[ds.name] = dict(res.counts, shards=res.set_dir)  # stable across resumes (MLflow params)
        tasks.append(make_task_data(cfg, ds, store=res.store))
        if cfg.loss.distill is not None:  # teacher vectors: computed once beside the shards, then reused
            from codiemb.train.distill import attach_teachers

            dirs = attach_teachers(cfg, tasks[-1], spec_for(cfg, ds), root, use_ray=use_ray)
            if dirs:
                counts[ds.name]["teachers"] = dirs
    return tasks, counts


def make_task_data(cfg: Config, ds, records: list[dict] | None = None, score_range=None, *, store=None) -> TaskData:
    """TaskData for config dataset ``ds`` over ``store`` (or in-memory ``records``).

    Slot counts are dataset-wide facts (the manifest's, identical on every rank): m = min(config
    positives, the most positives a row has), n = min(the dataset's ``negatives`` or the config's,
    the most negatives a row has). Rows with fewer leave slots empty; none is dropped.
    """
    m = n = 0
    if ds.task == "retrieval":
        if store is not None:
            stats = store.stats
            most_pos, most_neg = stats.get("max_positives", 0), stats.get("max_negatives", 0)
        else:
            most_pos = max((len(r["positives"]) for r in records or []), default=0)
            most_neg = max((len(r.get("negatives") or []) for r in records or []), default=0)
        if (store is not None and len(store) == 0) or (store is None and not records):
            raise DataError(f"dataset {ds.name!r}: no valid rows")
        want_n = ds.negatives if getattr(ds, "negatives", None) is not None else cfg.loss.retrieval.negatives
        m = min(cfg.loss.retrieval.positives, most_pos)
        n = min(want_n, most_neg)
        if n < want_n:
            log.info("dataset %s: %d hard-negative slots per query (config asks %d; no row has more)",
                     ds.name, n, want_n)
    if score_range is None:
        score_range = tuple(ds.score_range) if ds.score_range else (0.0, 5.0)
    from codiemb.data.build import dataset_instructions

    ins = dataset_instructions(cfg, ds)
    return TaskData(name=ds.name, task=ds.task, records=records, batch_size=ds.batch_size,
                    score_range=tuple(score_range), instruction=ins if any(ins.values()) else None,
                    num_positives=max(m, 1), num_negatives=n, store=store)


def model_options(cfg: Config) -> dict:
    """``Encoder.load`` keywords of ``cfg.model`` beyond name/pooling/normalize: the model's
    instructions (saved with it, used by evaluation), EOS appending and bidirectional attention.
    (``model.token_prepending`` is not among them: training refuses it, evaluation passes it.)"""
    m = cfg.model
    return {"instructions": m.instructions.model_dump(), "append_eos": m.append_eos, "bidirectional": m.bidirectional}


def refuse_token_prepending(cfg: Config) -> None:
    """``model.token_prepending`` is training-free (Fu et al. 2024): the token shards hold neither its
    template nor its placeholder, so a training step cannot run it. ConfigError when it is on."""
    if cfg.model.token_prepending.enabled:
        raise ConfigError("model.token_prepending is training-free: it applies when encoding and evaluating "
                          "(codiemb evaluate MODEL --token-prepending), not in training; "
                          "set model.token_prepending.enabled: false to train")


def store_of(td: TaskData, encoder, cfg: Config):
    """``td``'s token store; in-memory ``records`` are tokenized once with ``encoder``'s tokenizer
    (cached on ``td`` for this tokenizer object and these max lengths)."""
    if td.store is not None:
        return td.store
    from codiemb.data.shards import ShardStore

    ml = cfg.model.max_length
    key = (ml.query, ml.passage, ml.sts)
    hit = td.cache.get("store")
    if hit is not None and hit[0] == key and hit[2] is encoder.tokenizer:
        return hit[1]
    t0 = time.perf_counter()
    store = ShardStore.from_records(encoder.tokenizer, td.task, td.records or [],
                                    {"query": ml.query, "passage": ml.passage, "sts": ml.sts},
                                    instruction=td.instruction)  # str or {query, passage, sts} (make_task_data)
    td.cache["store"] = (key, store, encoder.tokenizer)
    log.info("dataset %s: %d in-memory rows tokenized once in %.2f s", td.name, len(store), time.perf_counter() - t0)
    return store


# --------------------------------------------------------------------------- distributed context
@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    model: Any = None  # the DDP-wrapped EncoderStep during a multi-process train(); None otherwise
    prepare_model: Any = None  # how to wrap it (ray.train.torch.prepare_model on Ray); None: torch DDP
    should_stop: Any = None  # () -> bool: stop at the next step boundary (default: train.stop.requested)
    gradcache: Any = None  # train/gradcache.GradCache when train.mini_batch_size is set (train() sets it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class EncoderStep(torch.nn.Module):
    """The one module every forward of a step goes through, so that PyTorch DDP can wrap it.

    ``forward(features, layers)`` is the encoder's padded forward; ``forward(packed=P, path=K)``
    runs the packed (unpadded) forward ``K`` registered with :meth:`add_path`. DDP
    (``torch.nn.parallel.DistributedDataParallel``, or ``ray.train.torch.prepare_model`` on Ray)
    then all-reduces (averages) gradients bucket by bucket DURING backward, overlapping
    communication with compute, instead of one all-reduce after it. A step may call forward
    several times (queries, passages) before its one backward: each parameter's gradient is
    summed in the graph and DDP's hook fires once per parameter.
    """

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self._paths: dict[str, Any] = {}  # not submodules: they read the encoder's own weights

    def add_path(self, key: str, module) -> None:
        self._paths[key] = module

    def forward(self, features: dict | None = None, layers: list[int] | None = None, packed=None,
                path: str | None = None):
        if packed is not None:
            return self._paths[path](packed)
        return self.encoder(features, layers=layers)

    @contextlib.contextmanager
    def no_sync(self):
        """FSDP2 (``scaling.strategy: fsdp``, this module is then the ``fully_shard`` root): DDP's
        ``no_sync``, gradients accumulate unreduced until the update step."""
        self.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.set_requires_gradient_sync(True)


def _forward(encoder, ctx: "DistContext", features=None, layers=None, packed=None, path=None, module=None,
             ddp: bool = True):
    """A forward through the DDP-wrapped step module when there is one (ctx.model) and ``ddp``,
    else directly (GradCache's chunks but one: they accumulate locally, see train/gradcache.py)."""
    if ctx.model is None or not ddp:
        return module(packed) if packed is not None else encoder(features, layers=layers)
    if packed is not None:
        getattr(ctx.model, "module", ctx.model).add_path(path, module)
        return ctx.model(packed=packed, path=path)
    return ctx.model(features=features, layers=layers)


def wrap_for_ddp(encoder, ctx: "DistContext", prepare=None):
    """``EncoderStep(encoder)`` wrapped in DDP (``prepare`` is e.g. ``ray.train.torch.prepare_model``;
    default: ``torch.nn.parallel.DistributedDataParallel``). No wrap on one process."""
    import torch.distributed as dist

    if ctx.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return None
    step = EncoderStep(encoder)
    from torch.nn.parallel import DistributedDataParallel

    # its own process group: DDP's bucket all-reduces never interleave with the losses' gathers
    kwargs = {"find_unused_parameters": True, "process_group": dist.new_group(backend=dist.get_backend())}
    if prepare is not None:
        return prepare(step, kwargs)
    ids = [ctx.device.index] if ctx.device.type == "cuda" and ctx.device.index is not None else None
    return DistributedDataParallel(step, device_ids=ids, **kwargs)


# --------------------------------------------------------------------------- hooks
class Callbacks(Protocol):
    def on_log(self, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, path: Path) -> None: ...
    # optional, on the main rank: on_progress(done, total) before the first step and after each step


class _NoCallbacks:
    def on_log(self, step, metrics):
        pass

    def on_checkpoint(self, step, path):
        pass


@dataclass
class TrainResult:
    output_dir: str
    model_dir: str
    steps: int
    steps_per_task: dict[str, int]
    planned_steps_per_task: dict[str, int]
    samples_per_s: float
    tokens_per_s: float
    wall_s: float
    final_losses: dict[str, float]
    dev: dict[str, Any] | None = None
    data_counts: dict[str, dict] | None = None
    resumed_from: int | None = None
    grad_sync: str | None = None  # "DistributedDataParallel", or "none (one process)"
    no_duplicates: dict[str, dict] | None = None  # sampler.swap_summary(): batches that needed a swap


# --------------------------------------------------------------------------- helpers
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_lambda(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    def f(update: int) -> float:
        if warmup and update < warmup:
            return (update + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (update - warmup) / max(1, total - warmup)
        progress = min(max(progress, 0.0), 1.0)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return f


def _injection_due(var: str, kind: str, step: int, ctx: DistContext, marker_dir: Path) -> bool:
    """True once, at the step ``$VAR=RANK:STEP`` names, on that rank (a marker file stops repeats
    after the run restarts)."""
    spec = os.environ.get(var)
    if not spec:
        return False
    rank_s, step_s = spec.split(":")
    if int(rank_s) != ctx.rank or int(step_s) != step:
        return False
    marker = marker_dir / f".{kind}-injected-rank{ctx.rank}-step{step}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{kind}\n")
    return True


def _maybe_fail(step: int, ctx: DistContext, marker_dir: Path) -> None:
    """Fault injection: ``CODIEMB_FAIL_AT=RANK:STEP`` raises once at that step."""
    if _injection_due("CODIEMB_FAIL_AT", "fail", step, ctx, marker_dir):
        raise RuntimeError(f"CODIEMB_FAIL_AT: injected failure on rank {ctx.rank} at step {step}")


def _maybe_kill(step: int, ctx: DistContext, marker_dir: Path) -> None:
    """Fault injection: ``CODIEMB_KILL_AT=RANK:STEP`` SIGKILLs this worker process once at that step
    (no exception, no cleanup: what a lost node or an OOM kill looks like to Ray Train)."""
    if _injection_due("CODIEMB_KILL_AT", "kill", step, ctx, marker_dir):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _boundary_flags(ctx: DistContext, stop: bool, time_due: bool) -> tuple[bool, bool]:
    """Every rank's (stop, time checkpoint due) after one step, agreed by all ranks: each flag is
    True on all of them when it is True on any (one ``all_reduce`` MAX of two numbers), so no rank
    waits alone in the checkpoint's barrier and all stop at the same step."""
    import torch.distributed as dist

    if ctx.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return stop, time_due
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    flags = torch.tensor([float(stop), float(time_due)], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    stop_all, due_all = flags.tolist()
    return stop_all > 0, due_all > 0


def _trace_rows(step: int, ctx: DistContext, name: str, idx: list[int]) -> None:
    """``CODIEMB_ROW_TRACE=DIR``: append ``{step, rank, dataset, rows}`` to ``DIR/rank<r>.jsonl``
    (the resume test compares the rows consumed by a killed-and-resumed run with an uninterrupted one)."""
    folder = os.environ.get("CODIEMB_ROW_TRACE")
    if not folder:
        return
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{ctx.rank}.jsonl"), "a") as fh:
        fh.write(json.dumps({"step": step, "rank": ctx.rank, "dataset": name, "rows": [int(i) for i in idx]}) + "\n")


# --------------------------------------------------------------------------- retrieval forward: padded or unpadded
def unpadded_unsupported(cfg: Config, encoder, td: TaskData | None = None) -> str | None:
    """Why the unpadded retrieval forward cannot compute what the padded one does (None: it can)."""
    from codiemb.train.unpadded import unsupported_reason

    why = unsupported_reason(encoder.backbone)
    if why:
        return why
    if cfg.model.lora is not None:
        return "model.lora wraps the linear layers in adapters (the unpadded forward reads the raw weights)"
    if cfg.scaling.strategy == "fsdp":
        return "scaling.strategy is fsdp (the unpadded forward bypasses the layers' forward, where FSDP gathers weights)"
    if encoder.pooling != "mean":
        return f"pooling is {encoder.pooling!r} (the unpadded forward pools by mean)"
    if cfg.loss.matryoshka is not None and cfg.loss.matryoshka.layers:
        return "loss.matryoshka.layers needs every layer's states (the padded forward gives them)"
    if td is not None:
        if "has_instruction" not in td.cache:
            td.cache["has_instruction"] = bool(td.instruction) or (
                td.store.stats.get("with_instruction", 0) > 0 if td.store is not None
                else any(r.get("instruction") or r.get("passage_instruction") for r in td.records or []))
        if td.cache["has_instruction"]:
            return (f"dataset {td.name!r} has an instruction prefix (pooling skips it through "
                    "Encoder.tokenize's pool_mask, a padded-path feature)")
    return None


def _unpadded_not_worth_it(cfg: Config, device: torch.device) -> str | None:
    """``auto`` only: cases where unpadded would run but is slower or less precise than padded."""
    from codiemb.train.unpadded import resolve_backend

    if device.type == "cuda":
        if resolve_backend("auto", device) == "reference":
            return "no varlen attention kernel on this GPU (flash-attn or torch.nn.attention.varlen)"
        if not cfg.train.bf16:
            return "train.bf16 is off and the varlen kernels compute attention in bf16"
    return None


def retrieval_forward(cfg: Config, encoder, td: TaskData, device: torch.device | None = None) -> str:
    """``"unpadded"`` or ``"padded"`` for ``td``'s retrieval steps under ``cfg.train.retrieval_forward``.

    auto: unpadded when :func:`unpadded_unsupported` finds nothing (BERT backbone, mean pooling,
    no instruction prefix, no matryoshka layers) and, on a GPU, a varlen kernel and bf16 are
    there; else padded. ``unpadded`` where it is impossible raises ``ConfigError``.
    """
    mode = cfg.train.retrieval_forward
    if mode == "padded":
        return "padded"
    device = torch.device(device) if device is not None else encoder.device
    why = unpadded_unsupported(cfg, encoder, td)
    if why is None and mode == "auto":
        why = _unpadded_not_worth_it(cfg, device)
    elif why is not None and mode == "unpadded":
        raise ConfigError(f"train.retrieval_forward=unpadded is impossible here: {why}; "
                          "use train.retrieval_forward=auto or padded")
    choice = "padded" if why else "unpadded"
    if td.cache.get("forward_logged") != (mode, choice):
        td.cache["forward_logged"] = (mode, choice)
        log.info("retrieval dataset %s: %s forward%s", td.name, choice, f" ({why})" if why else "")
    return choice


def _unpadded_embeddings(encoder, pick, td, cfg, ctx):
    """Queries (B, D) and the filled passage slots (K, D) from ONE packed forward; and the token count."""
    from codiemb.train.unpadded import UnpaddedBert, mean_pool_packed, pack_lists

    texts = pick.queries + pick.passages
    tokens = sum(len(t) for t in texts)
    gc = cfg.model.gradient_checkpointing
    model = td.cache.get("unpadded_model")  # built once per dataset and backbone, not every step
    if model is None or model.backbone is not encoder.backbone or model.gradient_checkpointing != gc:
        model = td.cache["unpadded_model"] = UnpaddedBert(encoder.backbone, "auto", gradient_checkpointing=gc)

    def run(i, j, ddp=True):  # texts i..j packed into one sequence, mean-pooled
        packed = pack_lists(texts[i:j]).to(ctx.device)
        states = _forward(encoder, ctx, packed=packed, path=f"unpadded:{td.name}", module=model, ddp=ddp)
        return mean_pool_packed(states, packed)

    emb = run(0, len(texts)) if ctx.gradcache is None else ctx.gradcache.embed(run, len(texts))
    b = len(pick.queries)
    return emb[:b], emb[b:], tokens


def _embed(encoder, ctx: "DistContext", features: dict, layers=None):
    """The padded forward of ``features``; with GradCache (ctx.gradcache) chunk by chunk, each cut
    to its own longest text (``gradcache.row_chunk``)."""
    if ctx.gradcache is None:
        return _forward(encoder, ctx, features, layers=layers)
    from codiemb.train.gradcache import row_chunk

    return ctx.gradcache.embed(
        lambda i, j, ddp: _forward(encoder, ctx, row_chunk(features, i, j), layers=layers, ddp=ddp),
        len(features["input_ids"]))


def _fill_slots(found: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """(B, P, D) from the K filled slots' embeddings (row-major), zeros in the empty ones."""
    b, p = slots.shape
    if bool(slots.all()):
        return found.view(b, p, -1)
    full = found.new_zeros(b * p, found.shape[-1])
    where = slots.reshape(-1).nonzero().squeeze(1).to(found.device)
    return full.index_copy(0, where, found).view(b, p, -1)


# --------------------------------------------------------------------------- one step per task
def _earlier_layers(cfg: Config, encoder) -> list[int] | None:
    """hidden_states indices 1..N-1 of every earlier layer when 2D Matryoshka is on (else None)."""
    mat = cfg.loss.matryoshka
    if mat is None or not mat.layers:
        return None
    return list(range(1, encoder.num_layers))


def _loss_2d(loss_fn, cfg: Config, final: tuple, earlier: dict[int, tuple], layer_seed: int):
    """2D Matryoshka (``losses.matryoshka.matryoshka_2d``) over the last layer and the earlier ones.

    ``earlier`` maps hidden_states index l (1..N-1) to that layer's embeddings; the wrapper's keys
    are 0-based transformer layers (l-1, the last layer N-1), as sentence-transformers' Matryoshka2dLoss.
    The sampled layer comes from a generator seeded by the step only, so every rank picks the same one.
    """
    from codiemb.losses.matryoshka import matryoshka_2d

    mat = cfg.loss.matryoshka
    layers = {l - 1: emb for l, emb in earlier.items()}
    layers[max(earlier, default=0)] = final
    gen = torch.Generator().manual_seed(int(layer_seed))
    return matryoshka_2d(loss_fn, mat.dims, mat.weights, kl_weight=mat.layer_kl_weight)(layers, generator=gen)


def _rows_store(encoder, rows, td: TaskData, cfg: Config, idx):
    """The store and row ids of a step: ``td``'s store with ``idx``, or (direct callers passing
    ``rows`` only) an in-memory store of just those rows."""
    if idx is not None:
        return store_of(td, encoder, cfg), list(idx)
    tmp = TaskData(name=td.name, task=td.task, records=list(rows), instruction=td.instruction)
    return store_of(tmp, encoder, cfg), list(range(len(rows)))


def retrieval_loss(encoder, rows: list[dict] | None, td: TaskData, cfg: Config, ctx: DistContext,
                   rng: random.Random, idx: list[int] | None = None, layer_seed: int = 0):
    """Multi-positive InfoNCE for one retrieval batch: ``(loss, extras, non-pad tokens)``.

    ``idx``: the batch's row ids in ``td``'s store (the loop's way); without it ``rows`` (records)
    are tokenized now. Each row fills m positive and n negative slots chosen with ``rng``
    (``fast_batches.pick_retrieval``: the same calls on both forwards, so runs are reproducible
    and resumable); slots a row cannot fill are masked in the loss. The forward is
    :func:`retrieval_forward`'s choice; the loss (``info_nce``, gathered across workers,
    Matryoshka dims) is the same code.
    """
    from codiemb.losses.ir import info_nce
    from codiemb.train.fast_batches import pad_ids, pick_retrieval, with_pool_mask

    m, n = td.num_positives, td.num_negatives
    store, ids = _rows_store(encoder, rows, td, cfg, idx)
    pick = pick_retrieval(store, ids, m, n, rng)
    b = len(ids)
    slots = torch.from_numpy(pick.slots)
    layer_emb: dict[int, tuple] = {}
    if retrieval_forward(cfg, encoder, td, ctx.device) == "unpadded":
        q, found, tokens = _unpadded_embeddings(encoder, pick, td, cfg, ctx)
    else:
        qf = with_pool_mask(pad_ids(pick.queries, store.pad_id), pick.pool_starts)
        pf = with_pool_mask(pad_ids(pick.passages, store.pad_id), pick.passage_pool_starts)
        tokens = int(qf["attention_mask"].sum() + pf["attention_mask"].sum())
        qf = {k: v.to(ctx.device) for k, v in qf.items()}
        pf = {k: v.to(ctx.device) for k, v in pf.items()}
        earlier = _earlier_layers(cfg, encoder)
        qo, po = _embed(encoder, ctx, qf, layers=earlier), _embed(encoder, ctx, pf, layers=earlier)
        q, found = qo["embedding"], po["embedding"]
        if earlier:
            layer_emb = {l: (qo["layer_embeddings"][l], _fill_slots(po["layer_embeddings"][l], slots))
                         for l in earlier}
    p = _fill_slots(found, slots)
    gather = cfg.loss.retrieval.gather_across_workers and ctx.world_size > 1
    # masked whenever ANY row of the dataset may leave a slot empty (a dataset-wide fact, so every
    # rank makes the same choice and the gathered masks agree without another collective)
    st = store.stats
    may_be_empty = st.get("min_positives", m) < m or st.get("min_negatives", n) < n
    mask = slots.to(q.device) if (may_be_empty or not pick.full) else None
    loss_fn = lambda qq, pp: info_nce(qq, pp, m, temperature=cfg.loss.retrieval.temperature, gather=gather,  # noqa: E731
                                      mask=mask)
    if cfg.loss.matryoshka is not None:
        from codiemb.losses.matryoshka import matryoshka

        if cfg.loss.matryoshka.layers:  # the unpadded path refuses layers, so layer_emb exists here
            loss = _loss_2d(loss_fn, cfg, (q, p), layer_emb, layer_seed)
        else:
            loss = matryoshka(loss_fn, cfg.loss.matryoshka.dims, cfg.loss.matryoshka.weights)(q, p)
    else:
        loss = loss_fn(q, p)
    negatives_seen = b * ctx.world_size * (1 + n) - 1 if gather else b * (1 + n) - 1
    extra = {"negatives_per_query": float(negatives_seen), "empty_slots": float((~pick.slots).sum())}
    if td.teachers and idx is not None:  # loss.distill: the teacher's in-batch similarities, looked up
        from codiemb.train.distill import retrieval_term

        d_loss, d_weight = retrieval_term(cfg, td, ids, pick, q, p)
        loss = loss + d_weight * d_loss
        extra["distill"] = float(d_loss.detach())
    return loss, extra, tokens


def sts_loss_step(encoder, rows: list[dict] | None, td: TaskData, cfg: Config, ctx: DistContext, layer_seed: int = 0,
                  idx: list[int] | None = None):
    """The STS composite for one batch: rows ``idx`` of ``td``'s store (or in-memory ``rows``)."""
    from codiemb.losses.sts import sts_loss
    from codiemb.train.fast_batches import pad_ids, with_pool_mask

    w = cfg.loss.sts
    store, ids = _rows_store(encoder, rows, td, cfg, idx)
    pairs = [store.sts_row(i) for i in ids]
    b = len(pairs)
    feats = pad_ids([p[0] for p in pairs] + [p[1] for p in pairs], store.pad_id)
    if store.stats.get("with_instruction", 0):  # instruction prefixes: left out of mean pooling
        starts = [store.pool_starts(i) for i in ids]
        feats = with_pool_mask(feats, [s[0] for s in starts] + [s[1] for s in starts])
    feats = {k: v.to(ctx.device) for k, v in feats.items()}
    layers = None
    if w.mid_nce:
        mid = w.mid_nce_layer if w.mid_nce_layer is not None else max(1, encoder.num_layers // 2)
        layers = [mid]
    earlier = _earlier_layers(cfg, encoder)
    out = _embed(encoder, ctx, feats, layers=sorted(set(layers or []) | set(earlier or [])) or None)
    e1, e2 = out["embedding"][:b], out["embedding"][b:]
    mid1 = mid2 = None
    if layers:
        mid_emb = out["layer_embeddings"][layers[0]]
        mid1, mid2 = mid_emb[:b], mid_emb[b:]
    y = torch.tensor([p[2] for p in pairs], dtype=torch.float32, device=ctx.device)
    gather = ctx.world_size > 1
    if cfg.loss.matryoshka is not None:
        from codiemb.losses.matryoshka import matryoshka

        parts_box: dict[str, float] = {}

        def fn(a, c):
            loss, parts = sts_loss(a, c, y, w, mid1=mid1, mid2=mid2, score_range=td.score_range, gather=gather)
            parts_box.update(parts)
            return loss

        if earlier:
            layer_emb = {l: (out["layer_embeddings"][l][:b], out["layer_embeddings"][l][b:]) for l in earlier}
            loss = _loss_2d(fn, cfg, (e1, e2), layer_emb, layer_seed)
        else:
            loss = matryoshka(fn, cfg.loss.matryoshka.dims, cfg.loss.matryoshka.weights)(e1, e2)
        parts = parts_box
    else:
        loss, parts = sts_loss(e1, e2, y, w, mid1=mid1, mid2=mid2, score_range=td.score_range, gather=gather)
    if td.teachers and idx is not None:  # loss.distill: the teacher's cosine of each pair, looked up
        from codiemb.train.distill import sts_term

        d_loss, d_weight = sts_term(cfg, td, ids, e1, e2)
        loss = loss + d_weight * d_loss
        parts = dict(parts, distill=float(d_loss.detach()))
    return loss, parts, int(feats["attention_mask"].sum())


# --------------------------------------------------------------------------- the loop
def train(
    cfg: Config,
    tasks: list[TaskData] | None = None,
    *,
    output_dir: str | Path | None = None,
    ctx: DistContext | None = None,
    callbacks: Callbacks | None = None,
    resume: bool = True,
    stop_after: int | None = None,
    data_counts: dict[str, dict] | None = None,
    resume_from: str | Path | None = None,
    fail_marker_dir: str | Path | None = None,
) -> TrainResult:
    """Train ``cfg`` and write ``<output>/model`` (a sentence-transformers folder).

    ``tasks`` defaults to the token shards of ``cfg.data.datasets`` (built or reused without
    Ray, :func:`load_task_data`). Every rank reads its slice of each global batch from the shards
    by row id (``TaskBatchSampler.batch(step, rank)``), so the rows of a step are a pure function
    of (seed, step): a resumed run, on any rank, consumes exactly the rows it would have. ``stop_after``
    stops (after checkpointing) at that step, to test resume. A stop asked for while training
    (``ctx.should_stop``, default :func:`codiemb.train.stop.requested`: SIGTERM) checkpoints at the
    next step boundary (the next optimizer update with ``grad_accum``) and raises
    :class:`~codiemb.train.stop.TrainingStopped`. With ``resume`` the newest valid
    checkpoint under ``<output>/checkpoints`` (or ``resume_from``, e.g. the checkpoint Ray Train
    hands back after a failure) is restored exactly (weights, optimizer, scheduler, RNG).

    """
    from codiemb.data.sampler import TaskBatchSampler
    from codiemb.model.encoder import Encoder
    from codiemb.train import checkpoint as ckpt
    from codiemb.train import stop as stopping
    from codiemb.train import memory
    from codiemb.train.fast_batches import make_adamw

    refuse_token_prepending(cfg)
    ctx = ctx or DistContext(device=torch.device("cuda" if torch.cuda.is_available() and cfg.scaling.use_gpu else "cpu"))
    callbacks = callbacks or _NoCallbacks()
    out = Path(output_dir or cfg.train.output or Path(cfg.storage.path) / cfg.run.name)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.run.seed)

    if tasks is None:
        tasks, data_counts = load_task_data(cfg, quarantine_dir=out)
    if not tasks:
        raise DataError("config has no datasets (data.datasets is empty)")
    by_name = {t.name: t for t in tasks}

    encoder = Encoder.load(cfg.model.name, pooling=cfg.model.pooling, normalize=cfg.model.normalize,
                           trust_remote_code=cfg.model.trust_remote_code, device=ctx.device,
                           **model_options(cfg))
    if cfg.model.gradient_checkpointing:
        encoder.enable_gradient_checkpointing()
    memory.prepare_encoder(encoder, cfg)  # model.lora, train.param_dtype
    encoder.train()
    if cfg.scaling.strategy == "fsdp" and ctx.world_size > 1:
        if cfg.train.mini_batch_size:
            raise ValueError("train.mini_batch_size (GradCache) with scaling.strategy: fsdp is not supported yet: "
                             "GradCache's chunk forwards bypass the FSDP root; use strategy: ddp")
        ctx.model = memory.shard_fsdp(EncoderStep(encoder), encoder, ctx)  # weights/grads/optimizer sharded
    else:
        ctx.model = wrap_for_ddp(encoder, ctx, ctx.prepare_model)  # gradients synchronised by DDP
    from codiemb.train.gradcache import GradCache  # train.mini_batch_size: the encoder runs that many texts at a time

    ctx.gradcache = GradCache(cfg.train.mini_batch_size, ctx.device) if cfg.train.mini_batch_size else None
    for t in tasks:  # decide each retrieval dataset's forward now (a ConfigError fails fast); tokenize once
        if t.task == "retrieval" and retrieval_forward(cfg, encoder, t, ctx.device) == "unpadded":
            store_of(t, encoder, cfg)

    sampler = TaskBatchSampler(
        {t.name: len(t) for t in tasks}, {t.name: t.batch_size for t in tasks},
        world_size=ctx.world_size, policy=cfg.sampler.policy, temperature=cfg.sampler.temperature,
        epochs=cfg.train.epochs, seed=cfg.run.seed,
        row_hashes={t.name: store_of(t, encoder, cfg).row_hashes for t in tasks
                    if t.task == "retrieval" and cfg.sampler.no_duplicates},
    )
    total_steps = len(sampler) if cfg.train.max_steps is None else min(cfg.train.max_steps, len(sampler))
    accum = cfg.train.grad_accum
    total_updates = math.ceil(total_steps / accum)
    planned = {name: 0 for name in by_name}
    for name, _ in sampler.plan()[:total_steps]:
        planned[name] += 1

    optimizer = make_adamw(encoder, cfg.train.lr, cfg.train.weight_decay, ctx.device)
    warmup = int(math.ceil(cfg.train.warmup_ratio * total_updates))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.schedule, warmup, total_updates))

    start_step, resumed_from = 0, None
    done_per_task = {name: 0 for name in by_name}
    ckpt_root = out / "checkpoints"
    if resume:
        latest = Path(resume_from) if resume_from else ckpt.latest_checkpoint(ckpt_root)
        if latest is not None:
            state = ckpt.restore_checkpoint(latest, encoder, optimizer, scheduler,
                                            fsdp=ctx if memory.is_fsdp(ctx.model) else None)
            start_step = resumed_from = int(state["step"])
            done_per_task.update(state.get("steps_per_task", {}))
            log.info("resumed from %s (step %d of %d)", latest, start_step, total_steps)

    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if ctx.device.type == "cuda" and cfg.train.bf16
                else torch.autocast("cpu", enabled=False))
    progress = None
    if ctx.is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True,
                        disable=os.environ.get("CODIEMB_NO_PROGRESS") == "1")
    metrics_file = open(out / "metrics.jsonl", "a") if ctx.is_main else None
    on_progress = getattr(callbacks, "on_progress", None) if ctx.is_main else None  # the console's stage line
    if on_progress is not None:
        on_progress(start_step, total_steps)
    window_samples = window_tokens = 0
    window_start = time.perf_counter()
    total_samples = total_tokens = 0
    train_start = time.perf_counter()
    last_losses: dict[str, float] = {}
    step = start_step
    should_stop = ctx.should_stop or stopping.requested
    every_s = cfg.train.checkpoint_every_minutes * 60 if cfg.train.checkpoint_every_minutes else None
    last_ckpt_time = time.monotonic()
    stop_at = None  # set (on every rank alike) once a stop was asked for
    try:
        for step in range(start_step, total_steps):
            _maybe_fail(step, ctx, Path(fail_marker_dir) if fail_marker_dir else out)
            _maybe_kill(step, ctx, Path(fail_marker_dir) if fail_marker_dir else out)
            name, idx = sampler.batch(step, ctx.rank)
            td = by_name[name]
            _trace_rows(step, ctx, name, idx)
            layer_seed = cfg.run.seed * 1_000_003 + step * 101  # 2D Matryoshka: the same layer on every rank
            step_rng = random.Random(layer_seed + ctx.rank)
            # dropout draws from a generator seeded by (seed, step, rank): a resumed rank, whichever
            # rank's checkpoint it restored, draws exactly what the uninterrupted run drew
            torch.manual_seed(layer_seed * 7 + 1_000_033 * ctx.rank + 17)
            sync = (step + 1) % accum == 0 or step + 1 == total_steps
            no_sync = ctx.model.no_sync() if (ctx.model is not None and not sync) else contextlib.nullcontext()
            with no_sync:  # DDP: accumulate locally until the update step
                with autocast:
                    if td.task == "retrieval":
                        loss, extra, tokens = retrieval_loss(encoder, None, td, cfg, ctx, step_rng, idx=idx,
                                                             layer_seed=layer_seed)
                    elif td.task == "unsupervised":
                        loss, extra, tokens = unsupervised_loss_step(encoder, None, td, cfg, ctx, step_rng, idx=idx,
                                                                     layer_seed=layer_seed)
                    else:
                        loss, extra, tokens = sts_loss_step(encoder, None, td, cfg, ctx, layer_seed=layer_seed,
                                                            idx=idx)
                weight = cfg.loss.task_weights.get(td.task, 1.0) * cfg.loss.task_weights.get(td.name, 1.0)
                (loss * weight / accum).backward()  # with DDP: gradients averaged over ranks, bucket by bucket
                if ctx.gradcache is not None:  # GradCache: the loss stopped at the embeddings; re-run by chunks
                    ctx.gradcache.backward()
            done_per_task[name] += 1
            window_samples += len(idx) * ctx.world_size
            window_tokens += tokens * ctx.world_size
            last_losses[name] = float(loss.detach())

            if sync:
                if cfg.train.grad_clip:
                    torch.nn.utils.clip_grad_norm_(encoder.parameters(), cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            done = step + 1
            if ctx.is_main and (done % cfg.train.log_every == 0 or done == total_steps):
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                m = {f"loss/{name}": last_losses[name], "lr": scheduler.get_last_lr()[0],
                     "samples_per_s": window_samples / elapsed, "tokens_per_s": window_tokens / elapsed}
                m.update({f"{td.task}/{k}": float(v) for k, v in extra.items()})
                m.update({f"steps/{k}": float(v) for k, v in done_per_task.items()})
                total_samples += window_samples
                total_tokens += window_tokens
                window_samples = window_tokens = 0
                window_start = time.perf_counter()
                metrics_file.write(json.dumps({"step": done, **m}) + "\n")
                metrics_file.flush()
                callbacks.on_log(done, m)
                if progress is not None:
                    progress.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in m.items() if k.startswith("loss/")})
            if progress is not None:
                progress.update(1)
            if on_progress is not None:
                on_progress(done, total_steps)
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total_steps:
                # every rank embeds its share of the dev sets (evaluate/dev.py), so none waits idle
                # in a collective while rank 0 evaluates alone
                with memory.unsharded(ctx):
                    dev = evaluate_dev(encoder, cfg, ctx)
                if dev and ctx.is_main:
                    callbacks.on_log(done, {f"dev/{k}": v for k, v in dev.items()})
                encoder.train()
            # one agreed decision per step boundary: stop asked for (SIGTERM), time checkpoint due
            stop_now, time_due = _boundary_flags(ctx, stop_at is not None or bool(should_stop()),
                                                 every_s is not None and time.monotonic() - last_ckpt_time >= every_s)
            if stop_now and stop_at is None:
                stop_at = done
            want_ckpt = ((cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or done == stop_after
                         or time_due or stop_now)
            if want_ckpt and done % accum == 0 and done != total_steps:
                _checkpoint(ckpt, ckpt_root, done, encoder, optimizer, scheduler, sampler, done_per_task, cfg, ctx, callbacks)
                last_ckpt_time = time.monotonic()
                if stop_now:  # checkpoint at an optimizer update written: stop here
                    raise stopping.TrainingStopped(done, stopping.reason())
            if stop_after is not None and done >= stop_after:
                break
    finally:
        if progress is not None:
            progress.close()
        if metrics_file is not None:
            metrics_file.close()

    wall = time.perf_counter() - train_start
    total_samples += window_samples
    total_tokens += window_tokens
    finished = stop_after is None or step + 1 >= total_steps
    model_dir = out / "model"
    dev = None
    if finished:
        encoder.eval()
        full = memory.full_model_state(ctx)  # FSDP: gathered to rank 0 (every rank takes part); else None
        if ctx.is_main:
            encoder.save(model_dir, state_dict=full)
        if cfg.data.dev is not None and cfg.train.eval_at_end and os.environ.get("CODIEMB_SKIP_DEV") != "1":
            with memory.unsharded(ctx):
                dev = evaluate_dev(encoder, cfg, ctx)  # on every rank, as above
            if dev and ctx.is_main:
                callbacks.on_log(step + 1, {f"dev/{k}": v for k, v in dev.items()})
            if not ctx.is_main:
                dev = None
    result = TrainResult(
        output_dir=str(out), model_dir=str(model_dir), steps=step + 1 if total_steps else 0,
        steps_per_task=done_per_task, planned_steps_per_task=planned,
        samples_per_s=total_samples / max(wall, 1e-9), tokens_per_s=total_tokens / max(wall, 1e-9),
        wall_s=wall, final_losses=last_losses, dev=dev, data_counts=data_counts, resumed_from=resumed_from,
        grad_sync=type(ctx.model).__name__ if ctx.model is not None else "none (one process)",
        no_duplicates=sampler.swap_summary() or None,
    )
    if sampler.no_duplicates and ctx.is_main:
        log.info("no-duplicates batches: %s", ", ".join(
            f"{k}: {v['swapped']} of {v['batches']} batches needed a swap ({v['unresolved']} kept a duplicate)"
            for k, v in sampler.swap_summary().items()))
    if ctx.is_main and finished:
        (out / "train_summary.json").write_text(json.dumps(result.__dict__, indent=1, default=str))
    return result


def _checkpoint(ckpt, root, done, encoder, optimizer, scheduler, sampler, done_per_task, cfg, ctx, callbacks):
    """Rank 0 writes; every rank then calls ``on_checkpoint`` (path None off rank 0), so a
    callback may act as a barrier (``ray.train.report`` must be called by all workers). Under
    FSDP every rank first takes part in gathering the full model and optimizer states."""
    from codiemb.train import memory

    path = None
    model_state, optim_state = memory.full_model_state(ctx), memory.full_optimizer_state(ctx, optimizer)
    if ctx.is_main:
        path = ckpt.save_checkpoint(root, done, encoder, optimizer, scheduler,
                                    {"steps_per_task": dict(done_per_task), "sampler": sampler.state_dict(),
                                     "config": cfg.to_dict()},
                                    keep=cfg.train.keep_checkpoints, model_state=model_state,
                                    optimizer_state=optim_state)
        encoder.train()
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    callbacks.on_checkpoint(done, path)


# --------------------------------------------------------------------------- unsupervised texts
SURFACE_BUCKETS = 2048  # token ids hashed into this many buckets for DebCSE's token-overlap similarity


def delete_tokens(ids: np.ndarray, start: int, prob: float, rng: random.Random) -> np.ndarray:
    """``ids`` with each content token (positions start..len−2: after an instruction prefix and the
    leading special token, before the trailing one) deleted with probability ``prob``; at least one
    content token stays. DebCSE's surface-altered positive."""
    first, last = max(1, int(start)), len(ids) - 1
    if last - first < 2 or prob <= 0:
        return ids
    drop = [rng.random() < prob for _ in range(first, last)]
    if all(drop):
        drop[rng.randrange(len(drop))] = False
    keep = [True] * first + [not d for d in drop] + [True] * (len(ids) - last)
    return ids[np.asarray(keep, dtype=bool)]


def surface_features(views: tuple, starts: list[int], device) -> "object":
    """DebCSE's :class:`~codiemb.losses.unsupervised.SurfaceFeatures` of two id lists: content
    lengths and hashed bags of content token ids (special first/last positions and prefixes left out)."""
    from codiemb.losses.unsupervised import SurfaceFeatures

    out = []
    for seqs in views:
        lengths = torch.zeros(len(seqs), dtype=torch.float32)
        bags = torch.zeros(len(seqs), SURFACE_BUCKETS, dtype=torch.float32)
        for r, (ids, st) in enumerate(zip(seqs, starts)):
            content = np.asarray(ids[max(1, st): max(max(1, st), len(ids) - 1)], dtype=np.int64)
            lengths[r] = float(len(content))
            if len(content):
                bags[r, torch.from_numpy(content % SURFACE_BUCKETS)] = 1.0
        out += [lengths.to(device), bags.to(device)]
    return SurfaceFeatures(out[0], out[2], out[1], out[3])


def unsupervised_loss_step(encoder, rows: list[dict] | None, td: TaskData, cfg: Config, ctx: DistContext,
                           rng: random.Random, idx: list[int] | None = None, layer_seed: int = 0):
    """One unsupervised batch (single texts): ``(loss, extras, non-pad tokens)``.

    The B texts run through the encoder (train mode: dropout on) as ONE padded batch of V·B rows,
    V views of every text (independent dropout masks per row, as SimCSE's implementation):
    simcse and debcse V = 2 (debcse's second copy with tokens deleted, :func:`delete_tokens`),
    whitenedcse V = ``views``. The loss (``losses/unsupervised.py``) gathers across workers
    (``gather_across_workers``) and composes with Matryoshka (1D and 2D) like the other tasks; the
    whitening's channel shuffles come from a generator seeded by the step, the same on every rank.
    """
    from codiemb.losses import unsupervised as U
    from codiemb.train.fast_batches import pad_ids, with_pool_mask

    u = cfg.loss.unsupervised
    store, ids = _rows_store(encoder, rows, td, cfg, idx)
    texts, starts = zip(*(store.text_row(i) for i in ids)) if ids else ((), ())
    texts, starts = list(texts), list(starts)
    b = len(texts)
    v = u.views if u.method == "whitenedcse" else 2
    seqs = [list(texts) for _ in range(v)]
    if u.method == "debcse":
        seqs[1] = [delete_tokens(t, s, u.delete_prob, rng) for t, s in zip(texts, starts)]
    flat = [t for view in seqs for t in view]
    feats = pad_ids(flat, store.pad_id)
    if store.stats.get("with_instruction", 0):  # instruction prefixes: left out of pooling
        feats = with_pool_mask(feats, starts * v)
    tokens = int(feats["attention_mask"].sum())
    feats = {k: t.to(ctx.device) for k, t in feats.items()}
    earlier = _earlier_layers(cfg, encoder)
    out = _embed(encoder, ctx, feats, layers=earlier)
    gather = u.gather_across_workers and ctx.world_size > 1
    gen = torch.Generator().manual_seed(int(layer_seed) * 31 + 7)  # whitening shuffles: same on every rank
    extra: dict[str, float] = {"views": float(v)}

    def split(e):
        return tuple(e[k * b:(k + 1) * b] for k in range(v))

    if u.method == "simcse":
        loss_fn = lambda z1, z2: U.simcse_loss(z1, z2, u.temperature, gather=gather)  # noqa: E731
    elif u.method == "whitenedcse":
        def loss_fn(*zs):
            return U.whitenedcse_loss(torch.stack(zs), u.temperature, u.group_size, u.whiten_eps, u.whiten_grad,
                                      generator=gen, gather=gather)
    else:
        surf = surface_features((seqs[0], seqs[1]), starts, ctx.device)

        def loss_fn(z1, z2):
            loss, stats = U.debcse_loss(z1, z2, surf, u.temperature, u.false_negative_threshold, u.surface_bins,
                                        u.surface_alpha, u.max_weight, gather=gather, return_stats=True)
            extra.update(stats)
            return loss

    final = split(out["embedding"])
    if cfg.loss.matryoshka is not None:
        from codiemb.losses.matryoshka import matryoshka

        if earlier:
            layer_emb = {l: split(out["layer_embeddings"][l]) for l in earlier}
            loss = _loss_2d(loss_fn, cfg, final, layer_emb, layer_seed)
        else:
            loss = matryoshka(loss_fn, cfg.loss.matryoshka.dims, cfg.loss.matryoshka.weights)(*final)
    else:
        loss = loss_fn(*final)
    return loss, extra, tokens
