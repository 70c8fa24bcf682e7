"""The encoder: a Hugging Face ``AutoModel`` backbone plus a pooling head.

It reads and writes **sentence-transformers folders**, so a model trained here loads with
``SentenceTransformer(path)`` and gives the same embeddings::

    path/
      modules.json                      Transformer ("") -> Pooling (1_Pooling) [-> Normalize (2_Normalize)]
      config.json, model.safetensors    the backbone (safetensors only)
      tokenizer files
      sentence_bert_config.json         {"max_seq_length": N, "do_lower_case": false}
      config_sentence_transformers.json {"similarity_fn_name": "cosine", ...}
      1_Pooling/config.json             legacy ``pooling_mode_*`` keys, read by every ST version
      2_Normalize/                      only when the embedding is L2-normalised

Latent-attention pooling (NV-Embed) has weights; it is written as its own module folder
``1_LatentAttentionPooling/`` (config.json + model.safetensors) with the type
``codiemb.model.pooling.LatentAttentionPooling``. ``Encoder.load`` round-trips it;
sentence-transformers cannot load such a folder (the module is not an ST module).

A plain HF folder (no modules.json) loads with mean pooling and normalisation on.

Decoder LLMs (Llama / Qwen style, ``codiemb.model.decoder``): the tokenizer gets a pad token when
it has none, EOS appended to every text for last-token pooling (in its post-processor, so the
saved ``tokenizer.json`` does the same under sentence-transformers) and right padding;
``bidirectional`` sets the backbone config's ``is_causal: false``, saved in ``config.json``.

Instructions: ``instructions`` maps ``query`` / ``passage`` / ``sts`` to the model's instruction
prefixes (the ones it was trained with; evaluation uses them). They are saved as
sentence-transformers ``prompts`` (``query``, ``document``, ``sts``), so
``SentenceTransformer(path).encode(texts, prompt_name="query")`` embeds as
``encoder.encode(texts, instruction=encoder.instructions["query"])``.

Token Prepending (``token_prepending``, ``codiemb.model.token_prepending``; decoders with last-token
pooling, training-free): ``tokenize`` wraps each text in the template and inserts the placeholder,
``forward`` hooks the early decoder layers for that batch and pools ``output_layer``. It is a
run-time option: ``save`` writes the plain model (sentence-transformers knows no such step).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

from codiemb.errors import ModelError
from codiemb.model.decoder import is_causal_backbone, prepare_tokenizer, set_bidirectional
from codiemb.model.pooling import POOLING_KINDS, LatentAttentionPooling, pool
from codiemb.model.token_prepending import PLACEHOLDER_KEY, TokenPrepender, TokenPrepending

logger = logging.getLogger(__name__)

LATENT_MODULE_TYPE = "codiemb.model.pooling.LatentAttentionPooling"
LATENT_MODULE_DIR = "1_LatentAttentionPooling"
_DEFAULT_MAX_SEQ_LENGTH = 512
INSTRUCTION_KINDS = ("query", "passage", "sts")
# our instruction kinds -> sentence-transformers prompt names (encode_document reads "document")
_ST_PROMPT_NAMES = {"query": "query", "passage": "document", "sts": "sts"}

# sentence-transformers pooling names (new ``pooling_mode`` values and legacy ``pooling_mode_*`` keys) -> ours
_ST_POOLING = {"mean": "mean", "cls": "cls", "lasttoken": "last_token"}
_ST_LEGACY_KEYS = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                   "pooling_mode_lasttoken": "lasttoken", "pooling_mode_max_tokens": "max",
                   "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
                   "pooling_mode_weightedmean_tokens": "weightedmean"}


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: cannot read JSON ({exc})") from None


def _st_pooling_mode(cfg: dict, where: Path) -> str:
    """Our pooling name from a sentence-transformers ``1_Pooling/config.json`` (old or new keys)."""
    mode = cfg.get("pooling_mode")
    if mode is None:
        active = [name for key, name in _ST_LEGACY_KEYS.items() if cfg.get(key)]
        mode = active if active else ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in _ST_POOLING:
        raise ModelError(f"{where}: pooling {modes} is not supported (supported: mean, cls, lasttoken)")
    return _ST_POOLING[modes[0]]


class Encoder(nn.Module):
    """HF backbone + pooling. ``forward`` returns un-normalised embeddings; ``encode`` is for inference.

    Attributes: ``backbone``, ``tokenizer``, ``pooling`` ("mean" | "cls" | "last_token" |
    "latent_attention"), ``normalize``, ``max_seq_length``, ``dim``, ``num_layers``,
    ``latent_pooling`` (the ``LatentAttentionPooling`` module, or None), ``instructions``
    (``{"query"|"passage"|"sts": prefix}``, only those set) and ``is_decoder`` (causal backbone).

    The tokenizer is prepared in place (``decoder.prepare_tokenizer``: pad token, EOS for
    last-token pooling per ``append_eos``, right padding); ``bidirectional`` (None: as the
    backbone's config says) switches a decoder's attention. ``token_prepending`` (a
    ``TokenPrepending``, its config block or None) turns on Token Prepending; EOS is then not
    appended unless ``append_eos`` says so (the template's closing quote is the last token).
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, pooling: str = "mean", normalize: bool = True,
                 max_seq_length: int = _DEFAULT_MAX_SEQ_LENGTH, latent_pooling: LatentAttentionPooling | None = None,
                 name_or_path: str = "", instructions: dict[str, str | None] | None = None,
                 append_eos: bool | None = None, bidirectional: bool | None = None,
                 token_prepending: TokenPrepending | dict | None = None) -> None:
        super().__init__()
        if pooling not in POOLING_KINDS:
            raise ModelError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLING_KINDS)}")
        unknown = sorted(set(instructions or {}) - set(INSTRUCTION_KINDS))
        if unknown:
            raise ModelError(f"unknown instruction kind(s) {unknown}; choose from {', '.join(INSTRUCTION_KINDS)}")
        self.instructions = {k: v for k, v in (instructions or {}).items() if v}
        self.is_decoder = is_causal_backbone(backbone)
        if bidirectional is not None:
            set_bidirectional(backbone, bidirectional)
        self.backbone = backbone
        tp = TokenPrepending.from_config(token_prepending)
        if tp is not None and append_eos is None:
            append_eos = False  # PromptEOL: the last token is the template's closing quote, as in the paper
        self.tokenizer = prepare_tokenizer(tokenizer, pooling=pooling, append_eos=append_eos, decoder=self.is_decoder)
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.max_seq_length = int(max_seq_length)
        self.name_or_path = name_or_path
        cfg = backbone.config
        self.dim = int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)
        self.num_layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.get_text_config().num_hidden_layers)
        if pooling == "latent_attention" and latent_pooling is None:
            latent_pooling = LatentAttentionPooling(self.dim)
        self.latent_pooling = latent_pooling if pooling == "latent_attention" else None
        self.token_prepending = tp
        self._prepender = (TokenPrepender(tp, backbone, self.tokenizer, pooling=pooling, is_decoder=self.is_decoder)
                           if tp is not None else None)
        self.train(backbone.training)  # from_pretrained gives eval mode; the training loop calls .train()

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, name_or_path: str, *, pooling: str | None = None, normalize: bool | None = None,
             trust_remote_code: bool = False, device=None, instructions: dict[str, str | None] | None = None,
             append_eos: bool | None = None, bidirectional: bool | None = None,
             token_prepending: TokenPrepending | dict | None = None) -> "Encoder":
        """Load a sentence-transformers folder or a plain HF folder (``name_or_path`` may be an alias).

        ``pooling`` / ``normalize`` override what the folder says; ``instructions`` override the
        folder's saved prompts kind by kind (a kind given as None keeps the folder's);
        ``append_eos`` / ``bidirectional`` / ``token_prepending``: see the class. Problems raise ``ModelError``.
        """
        from transformers import AutoModel, AutoTokenizer

        from codiemb.paths import resolve_model

        resolved = resolve_model(name_or_path)
        root = Path(resolved)
        if not root.is_dir():
            raise ModelError(f"model {name_or_path!r} is not a local folder (codiemb loads local folders only)")
        spec = cls._read_st_layout(root)
        transformer_dir = spec["transformer_dir"]
        if not (transformer_dir / "config.json").is_file():
            raise ModelError(f"{transformer_dir}: not a model folder (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(transformer_dir), trust_remote_code=trust_remote_code)
            backbone = AutoModel.from_pretrained(str(transformer_dir), trust_remote_code=trust_remote_code)
        except Exception as exc:  # transformers raises many kinds; the user sees one line
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load model from {transformer_dir}: {msg}") from None

        max_len = spec["max_seq_length"]
        if max_len is None:
            tok_max = getattr(tokenizer, "model_max_length", None)
            max_len = tok_max if isinstance(tok_max, int) and 0 < tok_max < 1_000_000 else _DEFAULT_MAX_SEQ_LENGTH
        max_pos = getattr(backbone.config, "max_position_embeddings", None)
        if isinstance(max_pos, int) and max_pos > 0:
            max_len = min(max_len, max_pos)

        kind = pooling or spec["pooling"]
        latent = None
        if kind == "latent_attention" and spec["latent_dir"] is not None:
            latent = cls._load_latent(spec["latent_dir"])
        merged = dict(spec["instructions"])
        merged.update({k: v for k, v in (instructions or {}).items() if v is not None})
        enc = cls(backbone, tokenizer, pooling=kind,
                  normalize=spec["normalize"] if normalize is None else normalize,
                  max_seq_length=max_len, latent_pooling=latent, name_or_path=str(name_or_path),
                  instructions=merged, append_eos=append_eos, bidirectional=bidirectional,
                  token_prepending=token_prepending)
        if device is not None:
            enc.to(device)
        logger.info("loaded %s: pooling=%s normalize=%s max_seq_length=%d dim=%d layers=%d",
                    name_or_path, enc.pooling, enc.normalize, enc.max_seq_length, enc.dim, enc.num_layers)
        return enc

    @staticmethod
    def _read_st_layout(root: Path) -> dict:
        """Parse modules.json (if any) into transformer folder, pooling, normalize, max_seq_length."""
        spec = {"transformer_dir": root, "pooling": "mean", "normalize": True, "max_seq_length": None,
                "latent_dir": None, "instructions": {}}
        modules_path = root / "modules.json"
        if not modules_path.is_file():
            return spec  # plain HF folder
        st_cfg = root / "config_sentence_transformers.json"
        if st_cfg.is_file():
            prompts = _read_json(st_cfg).get("prompts") or {}
            spec["instructions"] = {k: prompts[name] for k, name in _ST_PROMPT_NAMES.items() if prompts.get(name)}
        modules = _read_json(modules_path)
        if not isinstance(modules, list):
            raise ModelError(f"{modules_path}: expected a list of modules")
        spec["normalize"] = False
        seen_transformer = False
        for m in sorted(modules, key=lambda m: int(m.get("idx", 0))):
            mtype = str(m.get("type", ""))
            folder = root / m.get("path", "")
            short = mtype.rsplit(".", 1)[-1]
            if mtype == LATENT_MODULE_TYPE:
                spec["pooling"], spec["latent_dir"] = "latent_attention", folder
            elif short == "Transformer":
                spec["transformer_dir"], seen_transformer = folder, True
                for cfg_dir in (folder, root):
                    sb = cfg_dir / "sentence_bert_config.json"
                    if sb.is_file():
                        val = _read_json(sb).get("max_seq_length")
                        spec["max_seq_length"] = int(val) if val else None
                        break
            elif short == "Pooling":
                spec["pooling"] = _st_pooling_mode(_read_json(folder / "config.json"), folder / "config.json")
            elif short == "Normalize":
                spec["normalize"] = True
            else:
                raise ModelError(f"{modules_path}: module type {mtype!r} is not supported by codiemb")
        if not seen_transformer:
            raise ModelError(f"{modules_path}: no Transformer module")
        return spec

    @staticmethod
    def _load_latent(folder: Path) -> LatentAttentionPooling:
        from safetensors.torch import load_file

        cfg = _read_json(folder / "config.json")
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelError(f"{weights}: latent-attention weights not found")
        module = LatentAttentionPooling(**cfg)
        module.load_state_dict(load_file(str(weights)))
        return module

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward (less memory, ~30% more compute)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.backbone, "activation_checkpointing_enable"):  # transformers >= 5
            self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if hasattr(self.backbone.config, "use_cache"):
            self.backbone.config.use_cache = False

    # ------------------------------------------------------------------ tokenize / forward
    def tokenize(self, texts: list[str], max_length: int | None = None,
                 instruction: str | None = None) -> dict[str, Tensor]:
        """Tokenize a batch (padded to the longest, truncated to ``max_length``).

        With ``instruction`` every text becomes ``instruction + text``; the result also holds
        ``pool_mask``: the attention mask with every position up to the instruction's last token
        (leading special tokens included) set to 0, so mean pooling reads only the text, as in
        NV-Embed (arXiv 2405.17428) and sentence-transformers' ``include_prompt=False``. Truncation
        cuts from the right, so the instruction is always kept.

        With Token Prepending each text is first put in its template (the instruction, if any,
        goes before it), then the placeholder is inserted after BOS (or first) and the result
        holds ``placeholder_position``; ``max_length`` counts the placeholder.
        """
        max_length = int(max_length or self.max_seq_length)
        texts = [str(t) for t in texts]
        if self._prepender is not None:
            tp_texts = [self.token_prepending.apply_template(t) for t in texts]
            return self._prepender.insert(self._tokenize(tp_texts, max_length - 1, instruction))
        return self._tokenize(texts, max_length, instruction)

    def _tokenize(self, texts: list[str], max_length: int, instruction: str | None) -> dict[str, Tensor]:
        if not instruction:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if not getattr(self.tokenizer, "is_fast", False):
            raise ModelError("instruction prefixes need a fast tokenizer (offset mapping)")
        side = self.tokenizer.truncation_side
        self.tokenizer.truncation_side = "right"
        try:
            enc = self.tokenizer([instruction + t for t in texts], padding=True, truncation=True,
                                 max_length=max_length, return_offsets_mapping=True,
                                 return_special_tokens_mask=True, return_tensors="pt")
        finally:
            self.tokenizer.truncation_side = side
        attn = enc["attention_mask"]
        # a token is text when it holds any character after the instruction (byte-level BPE glues
        # the instruction's trailing space to the first word: that token is text)
        ends = enc["offset_mapping"][..., 1]
        content = (enc["special_tokens_mask"] == 0) & attn.bool()
        is_inst = content & (ends <= len(instruction))
        has_text = (content & (ends > len(instruction))).any(dim=1)
        if any(t.strip() and not ok for t, ok in zip(texts, has_text.tolist())):
            raise ValueError(f"instruction {instruction!r} leaves no room for text within max_length={max_length}")
        positions = torch.arange(attn.size(1)).expand_as(attn)
        last_inst = torch.where(is_inst, positions, torch.full_like(positions, -1)).max(dim=1).values
        pool_mask = attn * (positions > last_inst.unsqueeze(1)).to(attn.dtype)
        return {"input_ids": enc["input_ids"], "attention_mask": attn, "pool_mask": pool_mask}

    def _pool(self, hidden: Tensor, attention_mask: Tensor, pool_mask: Tensor) -> Tensor:
        if self.pooling == "latent_attention":
            return self.latent_pooling(hidden, pool_mask)
        return pool(hidden, pool_mask if self.pooling == "mean" else attention_mask, self.pooling)

    def forward(self, features: dict[str, Tensor], layers: list[int] | None = None) -> dict:
        """Embed a tokenized batch.

        Returns ``{"embedding": (B, D)}`` (not normalised) and, when ``layers`` is given,
        ``"layer_embeddings": {l: (B, D)}``: the same pooling applied to ``hidden_states[l]``
        (0 = embedding output, ``num_layers`` = last layer; negative indices count from the end).
        """
        attention_mask = features["attention_mask"]
        pool_mask = features.get("pool_mask", attention_mask)
        inputs = {"input_ids": features["input_ids"], "attention_mask": attention_mask}
        if "token_type_ids" in features:
            inputs["token_type_ids"] = features["token_type_ids"]
        if (PLACEHOLDER_KEY in features) != (self._prepender is not None):
            raise ModelError("model.token_prepending is on but the batch has no placeholder (tokenize it with "
                             "Encoder.tokenize)" if self._prepender is not None else
                             "the batch holds a Token Prepending placeholder but this encoder has token_prepending off")
        if self._prepender is None:
            out = self.backbone(**inputs, output_hidden_states=bool(layers), return_dict=True)
            last_hidden = out.last_hidden_state
        else:  # Token Prepending: the early layers' placeholder input is hooked; pool output_layer
            output_layer = self.token_prepending.output_layer
            with self._prepender.applied(features[PLACEHOLDER_KEY], attention_mask):
                out = self.backbone(**inputs, output_hidden_states=bool(layers) or output_layer is not None,
                                    return_dict=True)
            last_hidden = out.last_hidden_state if output_layer is None else out.hidden_states[output_layer]
        result = {"embedding": self._pool(last_hidden, attention_mask, pool_mask)}
        if layers:
            hs = out.hidden_states
            result["layer_embeddings"] = {l: self._pool(hs[l], attention_mask, pool_mask) for l in layers}
        return result

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def encode(self, texts: list[str], *, batch_size: int = 64, max_length: int | None = None,
               instruction: str | None = None, normalize: bool | None = None, show_progress: bool = False,
               convert_to_numpy: bool = False, dtype: torch.dtype | None = None, progress=None):
        """Embed texts in eval mode. Returns float32 (N, D) on CPU (a numpy array if asked).

        Texts are batched longest first (less padding), and the original order is restored.
        ``dtype`` (torch.bfloat16 / torch.float16) turns on autocast, on CUDA only.
        ``progress``: a tqdm-like bar, moved by each batch's number of texts.
        """
        from tqdm.auto import tqdm

        texts = list(texts)
        normalize = self.normalize if normalize is None else normalize
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        device = self.device
        autocast = (torch.autocast(device_type="cuda", dtype=dtype)
                    if dtype is not None and device.type == "cuda" else nullcontext())
        chunks: list[Tensor] = []
        try:
            for start in tqdm(range(0, len(texts), batch_size), desc="encode", disable=not show_progress,
                              unit="batch"):
                batch = [texts[i] for i in order[start:start + batch_size]]
                feats = {k: v.to(device) for k, v in self.tokenize(batch, max_length, instruction).items()}
                with autocast:
                    emb = self(feats)["embedding"].float()
                if normalize:
                    emb = torch.nn.functional.normalize(emb, p=2, dim=-1)
                chunks.append(emb.cpu())
                if progress is not None:
                    progress.update(len(batch))
        finally:
            self.train(was_training)
        if chunks:
            sorted_emb = torch.cat(chunks)
            out = torch.empty_like(sorted_emb)
            out[torch.tensor(order)] = sorted_emb
        else:
            out = torch.empty(0, self.dim)
        return out.numpy() if convert_to_numpy else out

    # ------------------------------------------------------------------ saving
    def save(self, path: str | os.PathLike, state_dict: dict[str, Tensor] | None = None) -> Path:
        """Write a sentence-transformers folder at ``path`` (via a temp dir + rename; replaces safely).

        ``state_dict``: this encoder's full state dict (keys ``backbone.*``, ``latent_pooling.*``)
        to write instead of the live tensors, e.g. gathered from FSDP shards. A LoRA backbone
        (``model/lora.py``) is written merged: a plain model, no adapters.
        """
        from importlib.metadata import PackageNotFoundError, version

        from safetensors.torch import save_file

        from codiemb.model.lora import is_lora, merged_state_dict

        path = Path(path).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the saved model is an ordinary folder
        backbone, backbone_state = self.backbone, None
        if state_dict is not None:
            backbone_state = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        if is_lora(backbone):
            backbone, backbone_state = backbone.get_base_model(), merged_state_dict(backbone)
        try:
            backbone.save_pretrained(str(tmp), safe_serialization=True, state_dict=backbone_state)
            self.tokenizer.save_pretrained(str(tmp))
            modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
            if self.pooling == "latent_attention":
                (tmp / LATENT_MODULE_DIR).mkdir()
                _write_json(tmp / LATENT_MODULE_DIR / "config.json", self.latent_pooling.get_config())
                state = ({k[len("latent_pooling."):]: v for k, v in state_dict.items() if k.startswith("latent_pooling.")}
                         if state_dict is not None else self.latent_pooling.state_dict())
                state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
                save_file(state, str(tmp / LATENT_MODULE_DIR / "model.safetensors"))
                modules.append({"idx": 1, "name": "1", "path": LATENT_MODULE_DIR, "type": LATENT_MODULE_TYPE})
            else:
                st_mode = {"mean": "mean_tokens", "cls": "cls_token", "last_token": "lasttoken"}[self.pooling]
                pool_cfg = {"word_embedding_dimension": self.dim}
                for key in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens",
                            "weightedmean_tokens", "lasttoken"):
                    pool_cfg[f"pooling_mode_{key}"] = key == st_mode
                # mean pooling leaves the instruction out (pool_mask); cls / last token read the attention mask
                pool_cfg["include_prompt"] = self.pooling != "mean"
                (tmp / "1_Pooling").mkdir()
                _write_json(tmp / "1_Pooling" / "config.json", pool_cfg)
                modules.append({"idx": 1, "name": "1", "path": "1_Pooling",
                                "type": "sentence_transformers.models.Pooling"})
            if self.normalize:
                (tmp / "2_Normalize").mkdir()
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                                "type": "sentence_transformers.models.Normalize"})
            _write_json(tmp / "modules.json", modules)
            _write_json(tmp / "sentence_bert_config.json", {"max_seq_length": self.max_seq_length,
                                                            "do_lower_case": False})

            def _v(pkg: str) -> str:
                try:
                    return version(pkg)
                except PackageNotFoundError:
                    return "unknown"

            _write_json(tmp / "config_sentence_transformers.json", {
                "__version__": {"sentence_transformers": _v("sentence-transformers"),
                                "transformers": _v("transformers"), "pytorch": torch.__version__,
                                "codiemb": _v("codiemb")},
                "model_type": "SentenceTransformer",
                "prompts": {_ST_PROMPT_NAMES[k]: v for k, v in self.instructions.items()},
                "default_prompt_name": None, "similarity_fn_name": "cosine",
            })
            _replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved encoder to %s", path)
        return path


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _replace_dir(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; an existing ``dst`` is moved aside first and deleted only afterwards."""
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        old.rmdir()
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
