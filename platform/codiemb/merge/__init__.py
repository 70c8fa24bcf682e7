"""Model merging: state-dict merge methods (``methods``) and Self Positioning (``self_positioning``)."""

from codiemb.merge.methods import (
    MERGE_METHODS,
    MergeMethod,
    check_compatible,
    greedy_soup,
    merge_state_dicts,
    task_vectors,
)
from codiemb.merge.self_positioning import SelfPositionResult, embedding_probe, self_position

__all__ = [
    "MERGE_METHODS",
    "MergeMethod",
    "SelfPositionResult",
    "check_compatible",
    "embedding_probe",
    "greedy_soup",
    "merge_state_dicts",
    "self_position",
    "task_vectors",
]
