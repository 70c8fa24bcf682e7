"""Shared fixtures. Nothing here touches the network: HF_HUB_OFFLINE=1 for every test."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _shards_in_tmp(tmp_path_factory):
    """Token shards of every test go to one session temp folder, never into the checkout's runs/
    (a test that wants its own root sets data.shards)."""
    os.environ["CODIEMB_SHARDS"] = str(tmp_path_factory.mktemp("shards"))
    yield
    os.environ.pop("CODIEMB_SHARDS", None)


@pytest.fixture(scope="session")
def load_benchmark():
    """A function importing ``benchmarks/<name>.py`` as module ``<name>_bench`` (not a package)."""
    return _load_benchmark


def _load_benchmark(name: str):
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(f"{name}_bench", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"{name}_bench"] = module
    spec.loader.exec_module(module)
    return module


_WORDS = (
    "the a an of to in and is are was were be on for with as by at from that this it not no "
    "cat dog man woman child car house tree water fire sun moon red blue green big small good bad "
    "runs walks eats plays sleeps reads writes sees hears likes protein cell gene cancer risk study "
    "patients effect increase decrease treatment disease model data result shows found high low"
).split()


def build_tiny_bert(folder: Path, hidden: int = 32, layers: int = 2, heads: int = 2, seed: int = 0) -> Path:
    """A random BERT with a real WordPiece tokenizer, saved as a plain HF folder."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(_WORDS))
    vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"] + list("abcdefghijklmnopqrstuvwxyz0123456789.,!?-'")
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True)
    tok.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=hidden * 2, max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Path to a tiny random BERT + tokenizer (HF folder, safetensors)."""
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nodrop_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny BERT with dropout probabilities 0 (saved config), so train mode is deterministic."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("tiny-nodrop")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def sigterm_after(trace_file: Path, steps: int, timeout: float = 900.0):
    """A daemon thread that sends this process SIGTERM once ``trace_file`` records ``steps`` steps
    (a scheduler's stop request, as the fault tests need it, local and on Ray)."""
    import signal
    import threading
    import time

    def run():
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if trace_file.is_file() and len(trace_file.read_text().splitlines()) >= steps:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t
