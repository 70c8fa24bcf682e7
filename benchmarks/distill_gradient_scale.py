"""Gradient scale of the distillation forms on real training batches: how to set a new form's weight
so that it pushes the student about as hard as a form already measured, without looking at dev.

For STS, the gradient norm w.r.t. the student's sentence1 embeddings of ``cosine_mse`` and ``kl``
(losses/distill.py ``distill_sts``) on the first STS-B training batches; for retrieval, the
gradient norm w.r.t. the in-batch similarity matrix of ``kl`` and ``margin_mse`` (and of the
InfoNCE at τ 0.05 for reference) on the first SciFact training batches (queries and positives,
no negatives, as the recipe's rows). Teacher and student embed the texts here with
sentence-transformers' ``encode`` (no instructions), so the numbers are scales, not the loop's
exact values.

    .venv/bin/python benchmarks/distill_gradient_scale.py STUDENT --sts-teacher mpnet \\
        --ir-teacher runs/ir-scifact-hn1-r95/model [--batches 10]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F


def _rows(path, n):
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            out.append(json.loads(line))
            if len(out) == n:
                break
    return out


def _encode(model, texts, batch_size):
    return torch.tensor(model.encode(texts, normalize_embeddings=True, batch_size=batch_size))


def main(argv=None) -> dict:
    from sentence_transformers import SentenceTransformer

    from codiemb.losses.distill import distill_kl, distill_sts, margin_mse
    from codiemb.paths import data_dir, resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("student")
    ap.add_argument("--sts-teacher", default="mpnet")
    ap.add_argument("--ir-teacher", required=True)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--sts-batch", type=int, default=32)
    ap.add_argument("--ir-batch", type=int, default=16)
    args = ap.parse_args(argv)
    root = data_dir(None)
    student = SentenceTransformer(resolve_model(args.student))
    out: dict = {}

    sts = _rows(root / "sts/stsb/train.jsonl", args.batches * args.sts_batch)
    a, b = [r["sentence1"] for r in sts], [r["sentence2"] for r in sts]
    teacher = SentenceTransformer(resolve_model(args.sts_teacher))
    sa, sb, ta, tb = _encode(student, a, 32), _encode(student, b, 32), _encode(teacher, a, 32), _encode(teacher, b, 32)
    res = {"cosine_mse": [], "kl": []}
    for i in range(args.batches):
        sl = slice(i * args.sts_batch, (i + 1) * args.sts_batch)
        t = (ta[sl] * tb[sl]).sum(-1)
        for form in res:
            e1 = sa[sl].clone().requires_grad_(True)
            loss = distill_sts(form, e1, sb[sl], t)
            loss.backward()
            res[form].append((float(loss), float(e1.grad.norm())))
    out["sts"] = {k: dict(zip(("loss", "grad_norm"), np.mean(v, 0).round(4).tolist())) for k, v in res.items()}

    ir = _rows(root / "train/qp/scifact/scifact_train_pairs_nodev.jsonl", args.batches * args.ir_batch)
    q, p = [r["query"] for r in ir], [r["positive"] if isinstance(r["positive"], str) else r["positive"][0] for r in ir]
    teacher = SentenceTransformer(resolve_model(args.ir_teacher))
    sq, sp, tq, tp = _encode(student, q, 16), _encode(student, p, 16), _encode(teacher, q, 16), _encode(teacher, p, 16)
    res = {"kl": [], "margin_mse": [], "infonce": []}
    n = args.ir_batch
    for i in range(args.batches):
        sl = slice(i * n, (i + 1) * n)
        t = tq[sl] @ tp[sl].T
        for form in res:
            s = (sq[sl] @ sp[sl].T).clone().requires_grad_(True)
            loss = {"kl": lambda: distill_kl(s, t), "margin_mse": lambda: margin_mse(s, t, torch.arange(n)),
                    "infonce": lambda: F.cross_entropy(s / 0.05, torch.arange(n))}[form]()
            loss.backward()
            res[form].append((float(loss), float(s.grad.norm())))
    out["retrieval"] = {k: dict(zip(("loss", "grad_norm"), np.mean(v, 0).round(4).tolist())) for k, v in res.items()}
    def ratio(a, b, digits):  # nan where the teacher equals the student (no distillation gradient)
        return round(a / b, digits) if b > 0 else float("nan")

    out["ratios"] = {"sts kl / cosine_mse": ratio(out["sts"]["kl"]["grad_norm"], out["sts"]["cosine_mse"]["grad_norm"], 2),
                     "retrieval margin_mse / kl": ratio(out["retrieval"]["margin_mse"]["grad_norm"],
                                                        out["retrieval"]["kl"]["grad_norm"], 3)}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
