"""GPU training throughput: our retrieval step against sentence-transformers' MNRL trainer.

For a machine with one H100/H200 and torch, transformers, sentence-transformers, datasets and
accelerate, but NO Ray and NO codiemb install: ``codiemb`` is imported from ``platform/`` of this
repository copy, and nothing here imports ray or mlflow. Nothing is downloaded.

    python benchmarks/gpu/bench_gpu.py prepare            # on the data machine: texts + vocab -> assets/
    python benchmarks/gpu/bench_gpu.py run --out benchmarks/gpu/results
    python benchmarks/gpu/bench_gpu.py run --tiny --device cpu --out /tmp/gpu-smoke   # logic check on CPU

Model: BERT-base geometry (``BertConfig()`` defaults: 768 hidden, 12 layers, 12 heads, 3072 FFN),
random weights (seeded), the all-MiniLM-L6-v2 WordPiece vocabulary (= bert-base-uncased's);
both sides start from the same saved folder. Mixed precision bf16 (autocast, fp32 master
weights) on both sides.

Batches: ``scifact``: 128 SciFact queries (<= 64 tokens) with their positive passage (<= 256);
``snli``: 256 SNLI triplets (query, entailment, contradiction; all <= 64). Both sides get the
same batches, in the same order; blocks alternate ours / peer so clocks and load hit both.

Ours (variants, ``--variants``): pre-tokenized ids, fused AdamW, InfoNCE (tau 0.02), and
- ``varlen``: unpadded packed forward (``codiemb.train.unpadded``), flash-attn varlen if the
  package is present, else ``torch.nn.attention.varlen``; queries and passages in ONE pass;
- ``sdpa_bucketed``: the Hugging Face model with SDPA; the batch's texts sorted by length and
  run in chunks of ``--chunk`` texts, each padded only to its own longest text;
- ``+compile``: the same with ``torch.compile(dynamic=True)`` on the encoder.
Peer: ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss``, ``bf16=True``, its
default optimizer (fused AdamW), data loader and collator (tokenizes every step).

Reported per (dataset, side): samples/s, non-pad tokens/s, MFU, peak memory. MFU =
model FLOPs per second / peak, with model FLOPs per step = 6·N·T + 12·n_layers·d·Σ_i L_i²
(N = parameters of the transformer layers, embeddings excluded; T = non-pad tokens of the step;
L_i = non-pad length of text i; forward + backward = 3x forward; attention QKᵀ and AV are
2·L²·d each per layer in the forward). Peak: 989 TFLOP/s (H100 SXM / H200 dense bf16,
``--peak-tflops``). Peak memory: ``torch.cuda.max_memory_allocated`` during the side's block,
minus what was allocated at its start (the other side's model), plus the side's own weights,
gradients and AdamW state (16 bytes per parameter).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (REPO / "platform", REPO / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

ASSETS = HERE / "assets"
DATA = {"scifact": {"file": "scifact.jsonl", "negatives": 0, "batch": 128, "query": 64, "passage": 256},
        "snli": {"file": "snli.jsonl", "negatives": 1, "batch": 256, "query": 64, "passage": 64}}
SHARED_FILES = {"scifact": "train/qp/scifact/scifact_train_pairs_nodev.jsonl",
                "snli": "train/nli/snli/snli_dev_test_triplets.jsonl"}
ALL_VARIANTS = ["varlen", "varlen+compile", "sdpa_bucketed", "sdpa_bucketed+compile"]


# --------------------------------------------------------------------------- assets
def prepare(assets: Path, data_root: Path) -> None:
    """Write assets/{scifact,snli}.jsonl (query, positive[, negative]) and assets/vocab.txt."""
    from codiemb.data.local import read_records
    from codiemb.paths import resolve_model

    assets.mkdir(parents=True, exist_ok=True)
    for name, rel in SHARED_FILES.items():
        rows = read_records(data_root / rel, "retrieval").records
        n = DATA[name]["negatives"]
        with open(assets / DATA[name]["file"], "w", encoding="utf-8") as fh:
            for r in rows:
                if len(r["negatives"]) < n:
                    continue
                row = {"query": r["query"], "positive": r["positives"][0]}
                if n:
                    row["negative"] = r["negatives"][0]
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    shutil.copyfile(Path(resolve_model("minilm")) / "vocab.txt", assets / "vocab.txt")
    print(f"wrote {sorted(p.name for p in assets.iterdir())} to {assets}")


def load_rows(assets: Path, name: str) -> list[dict]:
    path = assets / DATA[name]["file"]
    if not path.is_file():
        raise SystemExit(f"{path} not found: run `python benchmarks/gpu/bench_gpu.py prepare` on the data machine "
                         "and carry benchmarks/gpu/assets")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows.append({"query": r["query"], "positives": [r["positive"]],
                     "negatives": [r["negative"]] if "negative" in r else []})
    return rows


def build_model_folder(folder: Path, vocab: Path, tiny: bool, seed: int) -> Path:
    """Random BERT (base geometry, or tiny) + WordPiece tokenizer, saved as a plain HF folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)  # transformers 5
    if tok.vocab_size < 1000:
        tok = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)  # transformers 4
    tok.save_pretrained(folder)
    cfg = BertConfig(vocab_size=tok.vocab_size)
    if tiny:
        cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128)
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------- FLOPs
def layer_params(backbone) -> int:
    return sum(p.numel() for p in backbone.encoder.parameters())


def step_flops(n_params: int, n_layers: int, d: int, lengths: list[int]) -> float:
    """6·N·T + 12·n_layers·d·Σ L_i² for one forward+backward over texts of these non-pad lengths."""
    return 6.0 * n_params * sum(lengths) + 12.0 * n_layers * d * sum(L * L for L in lengths)


# --------------------------------------------------------------------------- ours
class OursGPU:
    def __init__(self, folder: Path, variant: str, device: torch.device, opts, rows: list[dict], spec: dict):
        from codiemb.model.encoder import Encoder
        from codiemb.train.fast_batches import PretokenizedRetrieval, make_adamw
        from codiemb.train.unpadded import UnpaddedBert, resolve_backend

        self.variant, self.device, self.opts = variant, device, opts
        self.attn, _, comp = variant.partition("+")
        self.encoder = Encoder.load(str(folder), device=device)
        self.encoder.train()
        self.backend = resolve_backend(opts.backend, device) if self.attn == "varlen" else "sdpa"
        if self.attn == "varlen" and device.type == "cuda" and self.backend == "reference":
            raise RuntimeError("no varlen attention kernel (flash-attn or torch.nn.attention.varlen)")
        self.unpadded = UnpaddedBert(self.encoder.backbone, self.backend) if self.attn == "varlen" else None
        if comp == "compile":
            (self.unpadded or self.encoder.backbone).compile(dynamic=True)
        self.pretok = PretokenizedRetrieval.build(self.encoder.tokenizer, rows,
                                                  {"query": spec["query"], "passage": spec["passage"]},
                                                  num_positives=1, num_negatives=spec["negatives"])
        self.optimizer = make_adamw(self.encoder, opts.lr, 0.01, device)
        self.params = [p for p in self.encoder.parameters() if p.requires_grad]
        self.n_neg = spec["negatives"]
        self.dtype = torch.bfloat16 if opts.dtype == "bf16" else None
        self.static_bytes = 16 * sum(p.numel() for p in self.params)

    def _embed(self, seqs: list[list[int]]) -> torch.Tensor:
        from codiemb.train.fast_batches import pad_ids
        from codiemb.train.unpadded import mean_pool_packed, pack_lists

        if self.unpadded is not None:
            packed = pack_lists(seqs).to(self.device)
            return mean_pool_packed(self.unpadded(packed), packed)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        chunks = []
        for s in range(0, len(order), self.opts.chunk):
            feats = pad_ids([seqs[i] for i in order[s: s + self.opts.chunk]], self.pretok.pad_id)
            feats = {k: v.to(self.device, non_blocking=True) for k, v in feats.items()}
            chunks.append(self.encoder(feats)["embedding"])
        emb = torch.cat(chunks)
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return emb[inverse.to(self.device)]

    def step(self, idx: list[int]) -> list[int]:
        from codiemb.losses.ir import info_nce

        q_ids = [self.pretok.query[i] for i in idx]
        p_ids = self.pretok.passage_ids(idx)
        ctx = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else torch.autocast(
            self.device.type, enabled=False)
        with ctx:
            emb = self._embed(q_ids + p_ids)
            q, p = emb[: len(idx)], emb[len(idx):].view(len(idx), 1 + self.n_neg, -1)
            loss = info_nce(q, p, 1, temperature=0.02, gather=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return [len(s) for s in q_ids + p_ids]

    def block(self, batches: list[list[int]], warmup: int) -> dict:
        warm_tokens = 0
        for idx in batches[:warmup]:
            warm_tokens += sum(self.step(idx))
        _sync(self.device)
        start_alloc = _reset_peak(self.device)
        t0 = time.perf_counter()
        lengths: list[int] = []
        for idx in batches[warmup:]:
            lengths += self.step(idx)
        _sync(self.device)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "lengths": lengths, "samples": sum(len(b) for b in batches[warmup:]),
                "all_tokens": warm_tokens + sum(lengths), "peak_bytes": _peak(self.device, start_alloc) + self.static_bytes}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def _peak(device, start_alloc: int) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.max_memory_allocated(device) - start_alloc


# --------------------------------------------------------------------------- the run
def plan_batches(n_rows: int, batch: int, count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out: list[list[int]] = []
    while len(out) < count:
        order = list(range(n_rows))
        rng.shuffle(order)
        out += [order[i: i + batch] for i in range(0, n_rows - batch + 1, batch)]
    return out[:count]


def summarize(name: str, blocks: list[dict], flops_fn, peak_flops: float) -> dict:
    sps = [b["samples"] / b["seconds"] for b in blocks]
    tps = [sum(b["lengths"]) / b["seconds"] for b in blocks]
    mfu = [sum(flops_fn(b_len) for b_len in b["step_lengths"]) / b["seconds"] / peak_flops for b in blocks]
    return {"side": name, "samples_per_s": statistics.median(sps), "nonpad_tokens_per_s": statistics.median(tps),
            "mfu": statistics.median(mfu), "peak_mem_gib": max(b.get("peak_bytes", 0) for b in blocks) / 2**30,
            "per_pair_samples_per_s": sps}


def run(opts) -> dict:
    from throughput import Peer

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass
    device = torch.device(opts.device)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    from codiemb.train.unpadded import available_backends

    work = Path(opts.work)
    folder = build_model_folder(work / ("bert-tiny-random" if opts.tiny else "bert-base-random"),
                                Path(opts.assets) / "vocab.txt", opts.tiny, opts.seed)
    results: dict = {"command": opts.command, "device": _device_name(device), "torch": torch.__version__,
                     "transformers": transformers.__version__, "varlen_backends": available_backends(),
                     "peak_tflops": opts.peak_tflops, "datasets": {}}
    import sentence_transformers

    results["sentence_transformers"] = sentence_transformers.__version__
    for ds in opts.datasets:
        spec = dict(DATA[ds])
        if opts.tiny:
            spec["batch"] = max(4, spec["batch"] // 32)
        if opts.batch:
            spec["batch"] = opts.batch
        rows = load_rows(Path(opts.assets), ds)
        if opts.max_rows:
            rows = rows[: opts.max_rows]
        per_block = opts.warmup + opts.steps
        plan = plan_batches(len(rows), spec["batch"], opts.pairs * per_block, opts.seed)
        peer_opts = SimpleNamespace(batch_size=spec["batch"], lr=opts.lr, seed=opts.seed, warmup=opts.warmup,
                                    query_max_length=spec["query"], passage_max_length=spec["passage"],
                                    bf16=opts.dtype == "bf16")
        sides: dict[str, object] = {}
        errors: dict[str, str] = {}
        for v in opts.variants:
            try:
                sides[v] = OursGPU(folder, v, device, opts, rows, spec)
            except Exception as exc:  # noqa: BLE001 - a variant the stack cannot run is reported, not fatal
                errors[v] = f"{type(exc).__name__}: {exc}"
        peer = Peer(str(folder), rows, spec["negatives"], peer_opts, device) if not opts.skip_peer else None
        any_ours = next(iter(sides.values()), None)
        bb = any_ours.encoder.backbone if any_ours else None
        n_params = layer_params(bb) if bb is not None else 0
        cfg = bb.config if bb is not None else None
        flops_fn = (lambda lens: step_flops(n_params, cfg.num_hidden_layers, cfg.hidden_size, lens))

        blocks: dict[str, list[dict]] = {k: [] for k in [*sides, "peer"]}
        mismatch: list[str] = []
        for k in range(opts.pairs):
            batches = plan[k * per_block: (k + 1) * per_block]
            for v, side in list(sides.items()):
                try:
                    b = side.block(batches, opts.warmup)
                except Exception as exc:  # noqa: BLE001 - e.g. a compile failure on this stack
                    errors[v] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    del sides[v]
                    blocks.pop(v, None)
                    continue
                b["step_lengths"] = _split_steps(b["lengths"], batches[opts.warmup:], spec["negatives"])
                blocks[v].append(b)
                print(f"[{ds}] pair {k + 1} ours {v}: {b['samples'] / b['seconds']:.1f} samples/s", flush=True)
            if peer is not None:
                _reset = _reset_peak(device)
                pb = peer.block(batches, 0)
                pb["peak_bytes"] = _peak(device, _reset) + 16 * sum(p.numel() for p in peer.model.parameters())
                # the peer's lengths: same batches -> same non-pad lengths as ours (checked via token totals)
                ref = next(iter(blocks.values()))[-1] if sides else None
                pb["lengths"] = ref["lengths"] if ref else []
                if ref is not None and ref["all_tokens"] != pb["all_tokens"]:
                    mismatch.append(f"pair {k + 1}: ours fed {ref['all_tokens']} non-pad tokens, "
                                    f"the peer {pb['all_tokens']}")
                pb["step_lengths"] = ref["step_lengths"] if ref else []
                blocks["peer"].append(pb)
                print(f"[{ds}] pair {k + 1} peer: {pb['samples'] / pb['seconds']:.1f} samples/s", flush=True)
        summary = [summarize(v, bl, flops_fn, opts.peak_tflops * 1e12) for v, bl in blocks.items() if bl]
        peer_sum = next((s for s in summary if s["side"] == "peer"), None)
        for s in summary:
            if peer_sum and s["side"] != "peer":
                ratios = [a / b for a, b in zip(s["per_pair_samples_per_s"], peer_sum["per_pair_samples_per_s"])]
                s["ratio_vs_peer"] = statistics.median(ratios)
        results["datasets"][ds] = {"batch": spec["batch"], "max_length": {"query": spec["query"],
                                                                          "passage": spec["passage"]},
                                   "layer_params": n_params, "summary": summary, "errors": errors,
                                   "same_batches": "; ".join(mismatch) or "yes",
                                   "steps": opts.steps, "warmup": opts.warmup, "pairs": opts.pairs}
        del sides, peer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _split_steps(lengths: list[int], batches: list[list[int]], n_neg: int) -> list[list[int]]:
    out, pos = [], 0
    for b in batches:
        n = len(b) * (2 + n_neg)
        out.append(lengths[pos: pos + n])
        pos += n
    return out


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def to_markdown(res: dict) -> str:
    lines = [f"GPU throughput ({res['device']}; torch {res['torch']}, transformers {res['transformers']}, "
             f"sentence-transformers {res['sentence_transformers']}; varlen backends {res['varlen_backends']})", "",
             f"`{res['command']}`", "",
             "MFU = (6·N·T + 12·n_layers·d·Σ L_i²) per step / step time / "
             f"{res['peak_tflops']:.0f} TFLOP/s (N = transformer-layer parameters, T = non-pad tokens, "
             "L_i = non-pad length of text i).", ""]
    for ds, r in res["datasets"].items():
        lines += [f"### {ds}: batch {r['batch']}, max length query {r['max_length']['query']} / passage "
                  f"{r['max_length']['passage']}, {r['pairs']} pairs x {r['steps']} timed steps", "",
                  "| side | samples/s | non-pad tokens/s | MFU | peak memory GiB | ours/peer |",
                  "|---|---:|---:|---:|---:|---:|"]
        for s in r["summary"]:
            ratio = f"{s['ratio_vs_peer']:.2f}" if "ratio_vs_peer" in s else "-"
            name = "sentence-transformers MNRL (peer)" if s["side"] == "peer" else f"ours: {s['side']}"
            mem = f"{s['peak_mem_gib']:.2f}" if res["device"] != "cpu" and not res["device"].startswith("cpu ") \
                else "n/a (cpu)"
            lines.append(f"| {name} | {s['samples_per_s']:.1f} | {s['nonpad_tokens_per_s']:.0f} | "
                         f"{100 * s['mfu']:.1f}% | {mem} | {ratio} |")
        lines.append(f"\nSame batches on both sides (non-pad tokens fed, every step): {r['same_batches']}")
        for v, e in r["errors"].items():
            lines.append(f"\n{v} did not run: {e}")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="write benchmark texts and the vocab into --assets (needs the shared data)")
    pr.add_argument("--assets", default=str(ASSETS))
    pr.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    r = sub.add_parser("run")
    r.add_argument("--device", default="cuda")
    r.add_argument("--tiny", action="store_true", help="tiny geometry and batches: a logic check, not a benchmark")
    r.add_argument("--assets", default=str(ASSETS))
    r.add_argument("--work", default="/tmp/codiemb-gpu-bench", help="where the random model folder is written")
    r.add_argument("--out", default=str(HERE / "results"))
    r.add_argument("--datasets", default="scifact,snli")
    r.add_argument("--variants", default="auto",
                   help=f"comma list from {ALL_VARIANTS}; auto: all on cuda, the uncompiled ones on cpu")
    r.add_argument("--backend", default="auto", help="varlen attention: auto | flash_attn | torch_varlen | reference")
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--pairs", type=int, default=3)
    r.add_argument("--batch", type=int, default=0, help="override the batch size (0: 128 scifact / 256 snli)")
    r.add_argument("--chunk", type=int, default=32, help="texts per padded chunk for sdpa_bucketed")
    r.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    r.add_argument("--lr", type=float, default=2e-5)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-rows", type=int, default=0)
    r.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM and H200: 989)")
    r.add_argument("--skip-peer", action="store_true")
    r.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.cmd == "run":
        args.datasets = [d for d in args.datasets.split(",") if d]
        if args.variants == "auto":
            args.variants = ALL_VARIANTS if args.device.startswith("cuda") else ["varlen", "sdpa_bucketed"]
        else:
            args.variants = [v for v in args.variants.split(",") if v]
        bad = [v for v in args.variants if v not in ALL_VARIANTS]
        if bad:
            p.error(f"unknown variants {bad}; choose from {ALL_VARIANTS}")
        if args.dtype is None:
            args.dtype = "bf16" if args.device.startswith("cuda") else "fp32"
        if args.warmup < 1:
            p.error("--warmup must be >= 1")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "benchmarks/gpu/bench_gpu.py", *argv])
    print("command: " + command, flush=True)
    opts = parse_args(argv)
    if opts.cmd == "prepare":
        prepare(Path(opts.assets), Path(opts.data_root))
        return 0
    if opts.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; use --device cpu --tiny for a logic check")
    opts.command = command
    res = run(opts)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "tiny-cpu" if opts.tiny else _slug(res["device"])
    (out / f"gpu_throughput_{tag}.json").write_text(json.dumps(res, indent=1) + "\n")
    md = to_markdown(res)
    (out / f"gpu_throughput_{tag}.md").write_text(md + "\n")
    print(md)
    return 0


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")[:40]


if __name__ == "__main__":
    raise SystemExit(main())
