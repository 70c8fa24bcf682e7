"""MLflow tracking and the model registry (DESIGN §5).

- :mod:`codiemb.tracking.mlflow_run`: ``start_run`` (resumable, config as params + config.yaml),
  ``SafeLogger`` (buffers while the server is away, never raises into training), ``redact``,
  ``loss_curve_png``.
- :mod:`codiemb.tracking.registry`: ``log_model``, ``register`` (alias ``challenger``), ``promote``
  (the gate that moves ``champion``), ``resolve_model_uri``, ``load_champion``.

Names are imported lazily so that ``import codiemb.tracking`` does not import MLflow.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "start_run": "mlflow_run", "SafeLogger": "mlflow_run", "redact": "mlflow_run", "redact_text": "mlflow_run",
    "loss_curve_png": "mlflow_run",
    "log_model": "registry", "register": "registry", "promote": "registry", "resolve_model_uri": "registry",
    "load_champion": "registry", "load_encoder": "registry", "model_card": "registry",
    "CHALLENGER": "registry", "CHAMPION": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"codiemb.tracking.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'codiemb.tracking' has no attribute {name!r}")
