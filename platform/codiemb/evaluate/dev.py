"""Dev-set scores during training, computed by every rank together (never test).

``train/loop.py``'s ``evaluate_dev`` runs on rank 0 alone while the other ranks wait inside the
next collective, which can time out under NCCL on a large dev corpus. Here, with
``ctx.world_size > 1``, EVERY rank embeds its share of the dev texts (the STS sentences, the
retrieval queries and, chunk by chunk, the streamed corpus: ``codiemb.evaluate.distributed``),
the embeddings are all-gathered, rank 0 searches and scores, and the result dict is broadcast,
so all ranks return the same thing at the same time. Each rank embeds exactly the batches one
process would, so W ranks give the same scores as one. ``world_size == 1`` (or ``ctx=None``) is
the one-process path.

Every rank must call :func:`evaluate_dev` at the same step with the same config.
"""

from __future__ import annotations

from codiemb.evaluate.distributed import broadcast_object


def evaluate_dev(encoder, cfg, ctx=None) -> dict[str, float]:
    """STS-B dev Spearman and the retrieval dev nDCG@10 (× 100): ``sts_spearman``,
    ``retrieval_ndcg@10`` and, when both are configured, their ``mean``. ``{}`` without dev data."""
    from codiemb.data.beir import load_beir
    from codiemb.evaluate.retrieval import evaluate_retrieval
    from codiemb.evaluate.sts import evaluate_sts
    from codiemb.paths import resolve_data_path

    dev = cfg.data.dev
    if dev is None:
        return {}
    out: dict[str, float] = {}
    ml = cfg.model.max_length
    if dev.sts:
        r = evaluate_sts(encoder, resolve_data_path(dev.sts, cfg.data.root), batch_size=64, max_length=ml.sts, ctx=ctx)
        out["sts_spearman"] = r["spearman"]
    if dev.retrieval:
        split = load_beir(resolve_data_path(dev.retrieval.beir, cfg.data.root), dev.retrieval.qrels, corpus=False)
        r = evaluate_retrieval(encoder, split, batch_size=64, query_max_length=ml.query, doc_max_length=ml.passage,
                               ctx=ctx)
        out["retrieval_ndcg@10"] = r["ndcg@10"]
    if len(out) == 2:
        out["mean"] = (out["sts_spearman"] + out["retrieval_ndcg@10"]) / 2
    return broadcast_object(out, ctx)
