"""A generic MLflow pyfunc that returns embeddings from a sentence-transformers folder.

Used when the ``mlflow.sentence_transformers`` flavor cannot log a model (an installed
sentence-transformers it does not support, or a folder it cannot re-save). The folder travels
unchanged as the artifact ``model``; ``predict`` takes a list of strings, a pandas Series, or a
DataFrame (first column, or a column named ``text``/``sentence``/``query``) and returns a
float32 array of shape (n, dim).

MLflow logs this file as "models from code" (``python_model=<this file>``), so loading the model
needs sentence-transformers but not codiemb.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc

TEXT_COLUMNS = ("text", "sentence", "query", "input", "inputs")


def to_texts(model_input: Any) -> list[str]:
    """Normalise the accepted input shapes to a list of strings."""
    try:
        import pandas as pd
    except ImportError:  # pragma: no cover
        pd = None
    if pd is not None and isinstance(model_input, pd.DataFrame):
        cols = [c for c in model_input.columns if str(c).lower() in TEXT_COLUMNS] or list(model_input.columns[:1])
        return [str(t) for t in model_input[cols[0]].tolist()]
    if pd is not None and isinstance(model_input, pd.Series):
        return [str(t) for t in model_input.tolist()]
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        for key in TEXT_COLUMNS:
            if key in model_input:
                return to_texts(model_input[key])
    if hasattr(model_input, "tolist"):
        model_input = model_input.tolist()
    return [str(t) for t in model_input]


class SentenceEmbedder(mlflow.pyfunc.PythonModel):
    """Embeddings from the sentence-transformers folder in the artifact ``model``.

    ``params`` at predict time may set ``batch_size`` (default 32) and ``normalize`` (default False:
    the folder's own modules decide, e.g. a Normalize module).
    """

    def load_context(self, context) -> None:
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(context.artifacts["model"], trust_remote_code=False)

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        params = params or {}
        texts = to_texts(model_input)
        return self.model.encode(
            texts,
            batch_size=int(params.get("batch_size", 32)),
            normalize_embeddings=bool(params.get("normalize", False)),
            convert_to_numpy=True,
            show_progress_bar=False,
        ).astype("float32")


mlflow.models.set_model(SentenceEmbedder())
