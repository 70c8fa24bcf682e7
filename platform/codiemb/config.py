"""One pydantic config tree for every command (DESIGN §4b).

YAML in, unknown keys rejected with their dotted path, ``--set a.b=value`` overrides, and the
resolved tree can be dumped back to YAML and logged with the run, so any result re-runs from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from codiemb.errors import ConfigError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- run / model
class RunConfig(Strict):
    name: str = "codiemb"
    seed: int = 0


class MaxLength(Strict):
    query: int = 64
    passage: int = 256
    sts: int = 64


class LoraConfig(Strict):
    """LoRA adapters through ``peft`` (``model/lora.py``): only the adapters train; saved models are merged."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = None  # None: peft's default for the model type (BERT: query, value)


class Instructions(Strict):
    """The model's instruction prefixes, used in training where a dataset or row gives none, saved
    with the model (sentence-transformers ``prompts``) and used by its evaluation."""

    query: str | None = None  # retrieval queries
    passage: str | None = None  # retrieval positives, negatives and corpus documents
    sts: str | None = None  # both STS sentences


class TokenPrependingConfig(Strict):
    """Token Prepending (Fu et al. 2024, arXiv 2412.11556; ``model/token_prepending.py``), training-free:
    applied by ``Encoder.encode`` and evaluation, refused by training. Causal decoders with last-token pooling."""

    enabled: bool = False
    start_layer: int = Field(1, ge=1)  # the placeholder's input to 0-based decoder layer l, start_layer <= l < end_layer,
    end_layer: int = Field(7, ge=2)    # is the last-token output of layer l-1 (the paper's Llama-2-7B range: 1, 7)
    template: str | None = 'This sentence : "{text}" means in one word:"'  # PromptEOL; null: the bare text
    output_layer: int | None = None  # hidden_states index (0 embeddings .. num_layers; negative from the end); null: last
    placeholder: str | None = None  # a token of the vocabulary; null: a stand-in with the mean embedding (no new vocab row)

    @model_validator(mode="after")
    def _check(self) -> "TokenPrependingConfig":
        if self.end_layer <= self.start_layer:
            raise ValueError(f"end_layer ({self.end_layer}) must exceed start_layer ({self.start_layer})")
        if self.template is not None and self.template.count("{text}") != 1:
            raise ValueError(f"template must hold '{{text}}' exactly once: {self.template!r}")
        return self


class ModelConfig(Strict):
    name: str = "minilm"  # alias, local folder, s3:// (or any pyarrow filesystem URI) folder, or (network permitting) hub id
    pooling: Literal["mean", "cls", "last_token", "latent_attention"] | None = None  # None: the folder's own
    normalize: bool = True
    max_length: MaxLength = MaxLength()
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None  # e.g. {r: 16, alpha: 32, target_modules: [query, key, value, dense]}
    # decoder LLMs (model/decoder.py): EOS appended to every text (None: for last_token pooling when
    # the tokenizer does not already), and bidirectional attention (None: the backbone config's own)
    append_eos: bool | None = None
    bidirectional: bool | None = None
    instructions: Instructions = Instructions()  # None fields: the saved model's own prompts (if any)
    token_prepending: TokenPrependingConfig = TokenPrependingConfig()  # decoders: training-free, encode/evaluate only


# --------------------------------------------------------------------------- data
class DatasetConfig(Strict):
    name: str
    task: Literal["sts", "retrieval", "unsupervised"]
    path: str  # relative paths resolve under data.root / the shared data folder; s3:// works
    format: Literal["auto", "jsonl", "parquet", "beir"] = "auto"
    score_range: tuple[float, float] | None = None  # sts: required range, e.g. [0, 5]
    qrels: str = "train"  # beir folders: which qrels split yields training pairs
    batch_size: int = Field(32, gt=0)
    instruction: str | None = None  # retrieval queries; sts: both sentences (a row's own wins)
    passage_instruction: str | None = None  # retrieval positives and negatives (a row's own wins)
    max_rows: int | None = None
    negatives: int | None = Field(None, ge=0)  # retrieval: hard-negative slots per row (default loss.retrieval.negatives)
    # unsupervised: the string fields of a row that are texts (each one a training text; other
    # fields, e.g. an STS score, are ignored): [text] by default, [sentence1, sentence2] reads an STS file
    text_fields: list[str] | None = None

    @model_validator(mode="after")
    def _text_fields(self) -> "DatasetConfig":
        if self.text_fields is not None:
            if self.task != "unsupervised":
                raise ValueError("text_fields is for task: unsupervised datasets")
            if not self.text_fields or len(set(self.text_fields)) != len(self.text_fields):
                raise ValueError(f"text_fields must be distinct field names, got {self.text_fields}")
        return self


class RetrievalDevConfig(Strict):
    beir: str
    qrels: str = "dev"


class DevConfig(Strict):
    sts: str | None = None
    retrieval: RetrievalDevConfig | None = None


class DataConfig(Strict):
    root: str | None = None  # data folder; default: $CODIEMB_DATA, ./data, ../shared/data
    on_bad_rows: Literal["fail", "quarantine"] = "fail"
    max_bad_fraction: float = Field(0.01, ge=0, le=1)
    datasets: list[DatasetConfig] = []
    dev: DevConfig | None = None
    shards: str | None = None  # token shards (local or s3://); default <storage.path>/shards
    build_concurrency: int = Field(2, ge=1)  # tokenizer actors of the Ray Data shard build
    # on Ray, inputs smaller than this (MB, all of a dataset's files) are validated and tokenized in the
    # driver: starting the tokenizer actor pool costs more than the pass (the quickstart's 808 SciFact
    # pairs: 88 s through the pool on a loaded machine, under 1 s in the driver); the shard set is the
    # same either way (same key, rows, order)
    ray_build_min_mb: float = Field(16.0, ge=0)

    @model_validator(mode="after")
    def _unique_names(self) -> "DataConfig":
        names = [d.name for d in self.datasets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset names must be unique, repeated: {', '.join(dupes)}")
        return self


class SamplerConfig(Strict):
    policy: Literal["proportional", "round_robin", "temperature"] = "proportional"
    temperature: float = Field(1.0, gt=0)
    # retrieval datasets: no global batch holds the same text (query, positive or negative) in two rows
    no_duplicates: bool = True


# --------------------------------------------------------------------------- losses
class RetrievalLossConfig(Strict):
    temperature: float = Field(0.02, gt=0)
    positives: int = Field(1, ge=1)
    negatives: int = Field(3, ge=0)
    gather_across_workers: bool = True


class StsLossConfig(Strict):
    """Weights of the order-aware STS objectives (CoDiEmb: MidNCE 1, PRO 0.5, Pearson 2, RankKL 5)."""

    cosent: float = 0.0
    pearson: float = 2.0
    rank_kl: float = 5.0
    pro: float = 0.5
    mid_nce: float = 1.0
    cosent_scale: float = 20.0
    rank_kl_temperature: float = 0.05
    pro_temperature: float = 0.05
    mid_nce_temperature: float = 0.05
    mid_nce_threshold: float = 0.8  # on scores normalised to [0, 1] by the dataset's score_range
    mid_nce_layer: int | None = None  # None: the middle layer


class UnsupervisedLossConfig(Strict):
    """Unsupervised contrastive objectives on single texts (``losses/unsupervised.py``)."""

    method: Literal["simcse", "whitenedcse", "debcse"] = "simcse"
    temperature: float = Field(0.05, gt=0)
    gather_across_workers: bool = True
    # whitenedcse: views = dropout passes per text (view 0 the anchor, the others its positives);
    # each view whitened over the batch with its own channel shuffle, in groups of group_size dims
    views: int = Field(3, ge=2)
    group_size: int = Field(6, ge=1)
    whiten_eps: float = Field(1e-5, ge=0)
    whiten_grad: bool = False  # backpropagate through the whitening matrix (the released code does not)
    # debcse: the positive is a second dropout view with tokens deleted (prob delete_prob); negatives
    # with detached cosine >= false_negative_threshold are dropped; inverse-propensity weights over
    # surface_bins bins of surface similarity (surface_alpha * token Jaccard + (1 - alpha) * length ratio)
    delete_prob: float = Field(0.1, ge=0, lt=1)
    false_negative_threshold: float = Field(0.9, gt=-1, le=1)
    surface_bins: int = Field(5, ge=1)
    surface_alpha: float = Field(0.5, ge=0, le=1)
    max_weight: float = Field(10.0, gt=0)


class MatryoshkaConfig(Strict):
    dims: list[int]
    weights: list[float] | None = None
    layers: bool = False  # 2D Matryoshka: also a random earlier layer each step
    layer_kl_weight: float = 1.0


class DistillTeacherConfig(Strict):
    model: str  # alias (e.g. mpnet) or folder
    tasks: list[str] = ["sts", "retrieval"]  # the tasks (or dataset names) whose batches this teacher serves
    weight: float = Field(1.0, gt=0)  # its share when several teachers serve one batch (scores averaged)
    pooling: Literal["mean", "cls", "last_token"] | None = None  # None: the folder's own
    max_length: MaxLength | None = None  # None: model.max_length
    batch_size: int = Field(64, ge=1)  # texts per teacher forward when scoring


class DistillConfig(Strict):
    """Teacher distillation (losses/distill.py); the teachers' embeddings of every training text
    are computed once beside the token shards (data/teacher.py), never in the training step."""

    teachers: list[DistillTeacherConfig] = Field(min_length=1)
    weights: dict[str, float] = {"retrieval": 1.0, "sts": 1.0}  # per task or dataset name; 0 / absent: off
    form: dict[str, Literal["kl", "margin_mse", "cosine_mse"]] = {"retrieval": "kl", "sts": "cosine_mse"}
    student_temperature: float = Field(0.05, gt=0)
    teacher_temperature: float = Field(0.05, gt=0)

    @model_validator(mode="after")
    def _forms(self) -> "DistillConfig":
        if self.form.get("sts") == "margin_mse":
            raise ValueError("form.sts: margin_mse needs (query, positive, negative) rows; use cosine_mse or kl")
        return self


class LossConfig(Strict):
    retrieval: RetrievalLossConfig = RetrievalLossConfig()
    sts: StsLossConfig = StsLossConfig()
    unsupervised: UnsupervisedLossConfig = UnsupervisedLossConfig()
    matryoshka: MatryoshkaConfig | None = None
    distill: DistillConfig | None = None  # e.g. {teachers: [{model: mpnet}]}
    task_weights: dict[str, float] = {}  # optional per-task (sts/retrieval/unsupervised) multipliers


# --------------------------------------------------------------------------- training / scaling
class TrainConfig(Strict):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = None
    lr: float = Field(3e-5, gt=0)
    weight_decay: float = 0.01
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    grad_clip: float | None = 1.0
    grad_accum: int = Field(1, ge=1)
    bf16: bool = True  # autocast on GPU only
    # dtype of the weights and so of the AdamW state (exp_avg, exp_avg_sq follow the parameters):
    # bfloat16 halves both (pure bf16 training: updates below bf16 resolution are lost; no master copy)
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    # How a RETRIEVAL step runs the encoder (STS steps are always padded):
    #   unpadded: each dataset is tokenized once; per step its queries and passages run as ONE packed
    #     sequence with block-diagonal attention (train/unpadded.py: no compute on padding).
    #     Needs a BERT backbone (model_type bert), mean pooling, no instruction prefix, no
    #     loss.matryoshka.layers; otherwise a ConfigError.
    #   padded: tokenize every step, pad to the batch maximum, the Hugging Face forward.
    #   auto: unpadded wherever it is possible (per dataset), else padded; on a GPU also only with
    #     a varlen kernel (flash-attn / torch varlen) and bf16 on (those kernels compute attention
    #     in bf16). Both paths give the same loss and gradients (tests/unit/test_loop_unpadded.py).
    retrieval_forward: Literal["auto", "padded", "unpadded"] = "auto"
    # GradCache (train/gradcache.py): the encoder runs at most this many texts at a time, first
    # without grad, then again chunk by chunk with the loss's cached embedding gradients, so the
    # contrastive batch (batch_size, gathered over workers) no longer depends on memory. Same loss
    # and gradients as without it; about one extra forward per step. None: one forward per batch.
    mini_batch_size: int | None = Field(None, ge=1)
    checkpoint_every: int = 200
    # also checkpoint when this many minutes passed since the last checkpoint (None: steps only), so
    # a restart loses minutes, not an epoch; all ranks agree at each step boundary (train/loop.py)
    checkpoint_every_minutes: float | None = Field(None, gt=0)
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end
    eval_at_end: bool = True  # score the dev sets (data.dev) after the last step
    log_every: int = 10
    output: str | None = None  # default: <storage.path>/<run.name>


class ScalingConfig(Strict):
    num_workers: int = Field(1, ge=1)
    # ddp: every worker holds the whole model, gradients all-reduced (DistributedDataParallel);
    # fsdp: weights, gradients and optimizer state sharded over the workers (FSDP2 fully_shard per
    # transformer layer and the root, train/memory.py), for models that do not fit one worker
    strategy: Literal["ddp", "fsdp"] = "ddp"
    use_gpu: bool = False
    resources_per_worker: dict[str, float] | None = None
    # Ray Train restarts the workers from the last reported checkpoint this many times after a
    # worker dies (SIGKILL, OOM kill, lost node); -1: without limit, 0: the first death ends the run
    max_failures: int = Field(3, ge=-1)
    autoscaling: bool = False  # the cluster can grow: do not fail fast when it is too small now


class StorageConfig(Strict):
    path: str = "runs"  # local folder or s3://bucket/prefix
    endpoint_url: str | None = None  # S3-compatible endpoint (e.g. moto on 127.0.0.1)


class TrackingConfig(Strict):
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "codiemb"


# --------------------------------------------------------------------------- merge / tune / register
class MergeModelConfig(Strict):
    model: str
    weight: float = 1.0
    parameters: dict[str, Any] = {}


class MergeConfig(Strict):
    """Shaped like mergekit's: a method, a base model, models with weights and parameters."""

    method: str = "delta_guided"
    base_model: str | None = None  # default: model.name
    models: list[MergeModelConfig] = []
    parameters: dict[str, Any] = {}  # e.g. gamma, lam, density, drop_p, t, granularity
    output: str | None = None
    evaluate: bool = False  # score the merge on the dev sets (fast pool, see tune.dev) into merge_report.json
    probe_size: int = Field(32, ge=1)  # self_positioning: examples per task (IR pairs, STS pairs) in the probe


class TuneDevConfig(Strict):
    """The fast dev scoring of a merge trial (``merge/evaluate_merge.py``).

    SciFact dev nDCG@10 is computed over a fixed candidate pool (every dev-relevant document plus
    the top ``bm25_candidates`` BM25 and top ``dense_candidates`` documents per dev query of each
    miner) instead of the whole corpus; STS-B dev on at most ``sts_max_pairs`` fixed pairs.
    """

    sts_max_pairs: int | None = Field(None, ge=2)  # None: every dev pair
    bm25_candidates: int = Field(10, ge=0)
    dense_candidates: int = Field(10, ge=0)
    miners: Literal["base", "all", "none"] = "base"  # dense miners: the base, the base and every model, none
    mine_max_length: int | None = Field(128, ge=8)  # doc length when mining the full corpus (once, cached)
    doc_max_length: int | None = Field(None, ge=8)  # doc length when scoring; default model.max_length.passage
    batch_size: int = Field(64, ge=1)
    cache_dir: str | None = None  # default <storage.path>/.cache/devpool
    reference: bool = True  # also score the base and each model (table + plot), before the trials


class TuneConfig(Strict):
    search: Literal["merge", "loss"] = "merge"
    num_samples: int = 20
    max_concurrent: int = 2
    algorithm: Literal["tpe", "nsga2", "random"] = "tpe"
    objective: Literal["weighted", "pareto", "maximin"] = "weighted"  # maximin: merge search, see tune/common.py
    objective_weights: dict[str, float] = {"sts": 0.5, "retrieval": 0.5}
    space: dict[str, Any] = {}  # name -> {type: uniform|loguniform|int|choice, ...}
    asha: dict[str, Any] = {}  # loss search: max_t, grace_period, reduction_factor (reports = rungs)
    resume: bool = True
    name: str | None = None  # experiment folder under <storage.path>/tune; default <run.name>-<search>-search
    trial_cpus: float | None = Field(None, ge=0)  # per trial; default 1 (merge), 0.1 (loss: its TorchTrainer's workers hold the CPUs)
    max_failures: int = Field(0, ge=0)  # retries of a crashed trial before it is recorded as failed
    seed: int | None = None  # sampler seed; default run.seed
    output: str | None = None  # where the best merge is written; default <experiment>/best-model
    dev: TuneDevConfig = TuneDevConfig()


class GateConfig(Strict):
    suite: str = "dev"  # a dev suite: the champion is never chosen on test (tracking/registry.check_gate_suite)
    margin: float = 0.1


class RegisterConfig(Strict):
    name: str = "codiemb"
    gate: GateConfig = GateConfig()


class PipelineConfig(Strict):
    stages: list[Literal["train", "merge", "tune", "evaluate", "register"]] = ["train", "evaluate", "register"]
    specialists: dict[str, dict[str, Any]] = {}  # name -> overrides applied to this config (dotted keys)


class Config(Strict):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    sampler: SamplerConfig = SamplerConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    merge: MergeConfig | None = None
    tune: TuneConfig | None = None
    registry: RegisterConfig | None = None  # DESIGN sketch calls it `register`; that name shadows a pydantic attribute
    pipeline: PipelineConfig | None = None
    evaluate: dict[str, Any] = {"suite": "default"}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out


# --------------------------------------------------------------------------- loading
def _parse_value(text: str) -> Any:
    """``--set`` values are YAML scalars/lists: 3e-5, true, [1, 2], null, strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.lr=3e-5")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = tree
        for p in parts[:-1]:
            if isinstance(node, list):
                try:
                    node = node[int(p)]
                    continue
                except (ValueError, IndexError):
                    raise ConfigError(f"--set {key}: {p!r} is not an index of a list of {len(node)}") from None
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
        last = parts[-1]
        if isinstance(node, list):
            try:
                node[int(last)] = _parse_value(raw)
            except (ValueError, IndexError):
                raise ConfigError(f"--set {key}: {last!r} is not an index of a list of {len(node)}") from None
        else:
            node[last] = _parse_value(raw)
    return tree


def _format_validation_error(source: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{path}'")
        else:
            problems.append(f"'{path}': {err['msg']}")
    return f"{source}: " + "; ".join(problems)


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or start from defaults), apply ``--set`` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "config"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
        tree = loaded
    tree = apply_overrides(tree, overrides)
    return config_from_dict(tree, source)
