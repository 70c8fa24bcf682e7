"""The distillation term of a training step (``loss.distill``; losses in ``losses/distill.py``).

Which teachers serve a dataset, with which form and weight, is read from the config per dataset:
``weights`` / ``form`` by dataset name, else by task; a teacher serves a dataset when its
``tasks`` name the dataset or its task. The teachers' vectors were computed once
(``data/teacher.py``); here they are only looked up for the step's rows and turned into the
teacher's similarities of the step's pairs, averaged over the serving teachers with their weights.
"""

from __future__ import annotations

import numpy as np
import torch

from codiemb.errors import ConfigError


def dataset_setting(cfg, name: str, task: str) -> tuple[float, str]:
    """(weight, form) of the distillation term on dataset ``name`` (weight 0: off)."""
    d = cfg.loss.distill
    weight = d.weights.get(name, d.weights.get(task, 0.0))
    form = d.form.get(name, d.form.get(task, "kl" if task == "retrieval" else "cosine_mse"))
    if task == "sts" and form == "margin_mse":
        raise ConfigError(f"loss.distill.form.{name}: margin_mse needs (query, positive, negative) rows")
    return float(weight), form


def serving_teachers(cfg, name: str, task: str) -> list:
    """The teacher configs that serve dataset ``name``; a ConfigError when its weight is on and none does."""
    d = cfg.loss.distill
    if d is None or dataset_setting(cfg, name, task)[0] == 0:
        return []
    found = [t for t in d.teachers if name in t.tasks or task in t.tasks]
    if not found:
        raise ConfigError(f"loss.distill: dataset {name!r} ({task}) has a distillation weight but no teacher "
                          f"serves it (add {task!r} or {name!r} to a teacher's tasks)")
    return found


def attach_teachers(cfg, td, spec, shards_root: str, *, use_ray: bool = False) -> list[str]:
    """Build (or reuse) the teacher vectors of ``td``'s shard set; set ``td.teachers``; their folders."""
    from codiemb.data.teacher import build_teacher_scores

    td.teachers = []
    for t in serving_teachers(cfg, td.name, td.task):
        scores = build_teacher_scores(td.store, spec, t, shards_root, use_ray=use_ray,
                                      concurrency=cfg.data.build_concurrency)
        td.teachers.append((scores, t.weight))
    return [s.set_dir for s, _ in td.teachers]


def open_teachers(td, dirs: list[str], cfg) -> None:
    """``td.teachers`` from folders built by :func:`attach_teachers` (Ray Train workers)."""
    from codiemb.data.teacher import TeacherScores

    weights = [t.weight for t in serving_teachers(cfg, td.name, td.task)]
    td.teachers = [(TeacherScores.open(d), w) for d, w in zip(dirs, weights)]


def _average(parts: list[tuple[np.ndarray, float]]) -> torch.Tensor:
    total = sum(w for _, w in parts)
    return torch.from_numpy(sum(x * (w / total) for x, w in parts).astype(np.float32))


def retrieval_term(cfg, td, ids: list[int], pick, q: torch.Tensor, passages: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(loss, weight) of the distillation term of a retrieval step over rows ``ids``."""
    from codiemb.losses.distill import distill_retrieval

    weight, form = dataset_setting(cfg, td.name, td.task)
    b, p = pick.slots.shape
    parts = []
    for scores, w in td.teachers:
        tq = scores.vectors(ids, np.zeros((b, 1), np.int64))[:, 0]  # (B, Dt)
        tp = scores.vectors(ids, pick.positions).reshape(b * p, -1)  # (B·P, Dt), zeros in empty slots
        parts.append((tq @ tp.T, w))
    t = _average(parts)
    d = cfg.loss.distill
    loss = distill_retrieval(form, q, passages, t, torch.from_numpy(pick.slots), td.num_positives,
                             d.student_temperature, d.teacher_temperature)
    return loss, weight


def sts_term(cfg, td, ids: list[int], e1: torch.Tensor, e2: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(loss, weight) of the distillation term of an STS step over rows ``ids``."""
    from codiemb.losses.distill import distill_sts

    weight, form = dataset_setting(cfg, td.name, td.task)
    parts = []
    for scores, w in td.teachers:
        v = scores.vectors(ids, np.tile(np.array([[0, 1]], np.int64), (len(ids), 1)))
        parts.append(((v[:, 0] * v[:, 1]).sum(-1), w))
    d = cfg.loss.distill
    return distill_sts(form, e1, e2, _average(parts), d.student_temperature, d.teacher_temperature), weight
