"""Where a model comes from (``paths.resolve_model``): storage URIs cached by content, hub ids offline.

The S3 path with moto and 2 Ray workers is tests/integration/test_model_storage.py; here the
same code reads through pyarrow's local filesystem (a ``file://`` URI given to ``fetch_model_folder``).
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from codiemb.errors import ModelError
from codiemb.model.encoder import Encoder
from codiemb.paths import cache_dir, fetch_model_folder, resolve_model


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CODIEMB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_storage_folder_is_copied_once_and_recopied_when_a_file_changes(tiny_model_dir, tmp_path, cache):
    src = tmp_path / "store" / "tiny"
    shutil.copytree(tiny_model_dir, src)
    first = fetch_model_folder(f"file://{src}/")
    assert first.parent == cache_dir() / "remote" and first.name.startswith("tiny-")
    assert sorted(p.name for p in first.iterdir() if p.name != ".codiemb-fetched") == sorted(p.name for p in src.iterdir())
    marker_mtime = (first / ".codiemb-fetched").stat().st_mtime_ns
    assert fetch_model_folder(f"file://{src}") == first  # same files: the cached copy, not a new one
    assert (first / ".codiemb-fetched").stat().st_mtime_ns == marker_mtime
    texts = ["the cat sleeps", "red sun"]
    torch.testing.assert_close(Encoder.load(str(first)).encode(texts), Encoder.load(str(tiny_model_dir)).encode(texts))

    st = (src / "config.json").stat()
    os.utime(src / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer file
    second = fetch_model_folder(f"file://{src}")
    assert second != first and second.is_dir() and first.is_dir()


def test_storage_uri_without_a_model_is_one_clear_error(tmp_path, cache):
    (tmp_path / "empty" / "x").mkdir(parents=True)
    (tmp_path / "empty" / "x" / "notes.txt").write_text("no model here")
    with pytest.raises(ModelError, match=r"no model folder there \(no config.json or modules.json; 1 files found\)"):
        fetch_model_folder(f"file://{tmp_path / 'empty'}")
    with pytest.raises(ModelError, match="model folder not found"):
        Encoder.load(f"file://{tmp_path / 'nothing-here'}")  # file:// resolves as a local path


def test_hub_id_offline_and_not_cached_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="nor in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids the hub") as err:
        resolve_model("some-org/no-such-model")
    assert "\n" not in str(err.value)


def test_hub_id_is_not_downloaded_without_the_explicit_command(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("CODIEMB_ALLOW_DOWNLOAD", "1")  # the old switch no longer downloads anything
    with pytest.raises(ModelError, match="download it once with `codiemb model fetch some-org/no-such-model`") as err:
        resolve_model("some-org/no-such-model")
    assert "\n" not in str(err.value)


def test_model_fetch_is_refused_offline(monkeypatch, capsys):
    from codiemb.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["model", "fetch", "some-org/no-such-model"]) == 2
    assert "HF_HUB_OFFLINE=1 forbids the hub" in capsys.readouterr().err
