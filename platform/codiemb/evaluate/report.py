"""Markdown tables for ``evaluate_model`` results (one model in detail, or several side by side)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# metric columns in display order; others follow alphabetically
_ORDER = ("spearman", "pearson", "ndcg@10", "mrr@10", "recall@10", "ndcg@100", "mrr@100", "recall@100")
_COUNTS = ("n", "n_queries", "n_docs")


def _fmt(v) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def _metric_keys(res: Mapping) -> list[str]:
    keys = [k for k in _ORDER if k in res]
    keys += sorted(k for k, v in res.items()
                   if k not in keys and k not in _COUNTS and k not in ("split", "seconds") and isinstance(v, float))
    return keys


def markdown_table(results: Mapping | Sequence[Mapping]) -> str:
    """One result: a row per (task, metric) plus the summary. A list of results: a row per model."""
    if not isinstance(results, Mapping):
        return _comparison_table(list(results))
    lines = [f"model: `{results.get('model', '?')}`, suite: `{results.get('suite', '?')}`", "",
             "| task | split | metric | score | n |", "|---|---|---:|---:|---:|"]
    for task, res in results.get("results", {}).items():
        n = res.get("n", res.get("n_queries", ""))
        for key in _metric_keys(res):
            lines.append(f"| {task} | {res.get('split', '')} | {key} | {_fmt(res[key])} | {n} |")
    summary = results.get("summary", {})
    if "mean" in summary and len(summary) > 2:
        lines.append(f"| **mean** | | main scores | **{_fmt(summary['mean'])}** | |")
    return "\n".join(lines) + "\n"


def _comparison_table(runs: list[Mapping]) -> str:
    cols: list[str] = []
    for r in runs:
        cols += [k for k in r.get("summary", {}) if k not in cols and k != "mean"]
    cols.append("mean")
    lines = ["| model | suite | " + " | ".join(cols) + " |", "|---|---|" + "---:|" * len(cols)]
    for r in runs:
        s = r.get("summary", {})
        lines.append(f"| {r.get('model', '?')} | {r.get('suite', '?')} | "
                     + " | ".join(_fmt(s[c]) if c in s else "–" for c in cols) + " |")
    return "\n".join(lines) + "\n"
