"""Write a tiny random-init decoder LLM (Llama / Qwen2 / Qwen3 style) as a plain HF folder.

No download: a byte-level BPE tokenizer is trained here on a few hundred words (the Qwen2
tokenizer class, ``<|endoftext|>`` as EOS and, like many decoder tokenizers, NO pad token) and
the model is random (``initializer_range`` 0.2 so that texts embed apart). Unit tests build their
decoders with :func:`build` (``tests/unit/test_decoder.py``); the acceptance runs train one::

    python benchmarks/tiny_decoder.py /tmp/tiny-qwen3 --family qwen3
    python -m codiemb.cli train CONFIG --set model.name=/tmp/tiny-qwen3 --set model.pooling=last_token ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

WORDS = ("the a an of to in and is are was be on for with as by at from that this it not no cat dog man woman "
         "child car house tree water fire sun moon red blue green big small good bad runs walks eats plays sleeps "
         "protein cell gene cancer risk study patients effect increase decrease treatment disease model data result "
         "shows found high low instruct query given claim retrieve documents support represent sentence similar "
         "retrieval passage").split()
FAMILIES = ("llama", "qwen2", "qwen3")


def build_tokenizer(vocab_size: int = 600):
    """A byte-level BPE ``Qwen2Tokenizer`` (any byte string encodes) with no pad token."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    corpus = [" ".join(WORDS), " ".join(w.capitalize() for w in WORDS), "0123456789 .,:;!?-'\"()\n"]
    bpe.train_from_iterator(corpus * 10, trainer)
    model = json.loads(bpe.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=vocab, merges=merges, pad_token=None)


def build_model(family: str, vocab_size: int, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                init: float = 0.2, max_positions: int = 512, eos_id: int | None = None):
    """A random ``LlamaModel`` / ``Qwen2Model`` / ``Qwen3Model`` (grouped-query attention, RoPE, RMSNorm)."""
    from transformers import LlamaConfig, LlamaModel, Qwen2Config, Qwen2Model, Qwen3Config, Qwen3Model

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaModel), "qwen2": (Qwen2Config, Qwen2Model),
                             "qwen3": (Qwen3Config, Qwen3Model)}[family]
    cfg = config_cls(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                     num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=hidden // heads, max_position_embeddings=max_positions, initializer_range=init,
                     attention_dropout=0.0, tie_word_embeddings=False, eos_token_id=eos_id, bos_token_id=None,
                     pad_token_id=None)
    return model_cls(cfg)


def build(folder: str | Path | None, family: str = "qwen3", seed: int = 0, **model_kwargs):
    """(model, tokenizer); saved to ``folder`` (safetensors) when it is given."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose from {', '.join(FAMILIES)}")
    tok = build_tokenizer()
    torch.manual_seed(seed)
    model = build_model(family, len(tok), eos_id=tok.eos_token_id, **model_kwargs)
    if folder is not None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(folder)
        model.save_pretrained(folder, safe_serialization=True)
    return model, tok


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="folder to write")
    ap.add_argument("--family", choices=FAMILIES, default="qwen3")
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model, tok = build(args.out, args.family, args.seed, hidden=args.hidden, layers=args.layers)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.family} ({n} parameters, vocab {len(tok)}, pad token {tok.pad_token!r}) to {args.out}")


if __name__ == "__main__":
    main()
