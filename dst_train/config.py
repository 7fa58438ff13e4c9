"""Typed run configuration: dataclasses loaded from YAML, overridden by ``key=value`` pairs.

Every option of a run is a field below with its documentation in the field's comment; this file
is the one place they are listed (docs/configuration.md is written from the same text by
:func:`reference`, ``make docs``; a test keeps the two equal).
Unknown keys are errors, values are checked against the field types, and the resolved config is
written into the run directory so a checkpoint carries the options that made it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_INT = 2**31 - 1


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


@dataclass
class DataConfig:
    root: str = ""  # dataset root: prepared/{train,val,test}.jsonl, frames/, dst/
    span_policy: str = "repair"  # DST children outside parent span: error | repair | clip
    train_split: str = "train"  # prepared/NAME.jsonl trained on
    val_split: str = "val"  # prepared/NAME.jsonl of the val loss
    max_seq_len: int = 4096  # tokens per sample; longer clips are split at a frame/turn boundary
    negative_frame_keep: float = (
        1.0  # fraction of silent/unchanged frames whose decision loss counts
    )
    feature_cache: str = ""  # folder of cached pooled vision features ("" = run the vision tower)
    num_workers: int = 0  # DataLoader workers per rank (train and val-loss loaders)


@dataclass
class ModelConfig:
    arch: str = (
        "tiny"  # tiny | smolvlm2-256m/-500m/-2.2b | qwen2.5-vl-3b/-7b | model folder | hub id
    )
    pretrained: bool = True  # load weights (folder/hub); False = random init from the architecture
    tokens_per_frame: int = 1  # k: a perfect square (1, 4, 9, ...)
    head_hidden: int = 0  # speak/update heads: 0 = linear, else MLP hidden width
    freeze_vision: bool = True  # vision tower frozen (needed for data.feature_cache)
    freeze_connector: bool = False  # connector (frame features → LM embeddings) frozen
    freeze_lm: bool = False  # LM and its output layer frozen (model.lora freezes them too)
    lora: bool = False  # LoRA adapters on the LM (heads and connector stay trainable)
    lora_r: int = 16  # LoRA rank
    lora_alpha: int = 32  # LoRA scale = lora_alpha / lora_r
    lora_dropout: float = 0.05  # dropout on each adapter's input
    lora_targets: list[str] = field(  # LM linear layers (module names) that get adapters
        default_factory=lambda: [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
    )
    qlora: bool = False  # 4-bit nf4 LM weights (bitsandbytes; GPU or CPU) + LoRA; ZeRO-0/1/2
    gradient_checkpointing: bool = False  # recompute LM activations in backward (less memory)
    # frames per vision-tower call when the tower runs online (training, evaluate's threshold
    # pass): bounds the tower's activations whatever the clip length; 0 = all frames at once.
    # Under ZeRO-3 all frames go in one call (each call gathers the weights on every rank)
    vision_chunk_frames: int = 64
    gradient_checkpointing_reentrant: bool = False  # torch's reentrant checkpoint variant
    dtype: str = "auto"  # auto | fp16 | bf16 | fp32 (auto: fp16 < sm80, bf16 >= sm80, cpu_dtype)
    cpu_dtype: str = "fp32"  # what auto means on CPU: fp32 | bf16
    attention: str = "auto"  # auto | sdpa | eager | flash_attention_2


ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass
class LossConfig:
    decision_loss: str = "focal"  # focal | bce (speak and update heads)
    focal_alpha: float = 0.25  # positives weight; negatives get 1 - alpha
    focal_gamma: float = 2.0  # focusing exponent of the decision focal loss
    text_focal_gamma: float = 0.0  # response/DST token loss: 0 = cross-entropy
    speak_weight: float = 1.0  # the speak decision loss's weight (the total: the weighted sum)
    update_weight: float = 1.0  # the update (dialog state changed) decision loss's weight
    response_weight: float = 1.0  # the response tokens' loss weight
    dst_weight: float = 1.0  # the dialog-state tokens' loss weight


@dataclass
class TrainConfig:
    ds_config: str = "ds_configs/zero2.json"  # DeepSpeed template; "auto" values are filled in
    micro_batch_size: int = 1  # samples per GPU per forward
    global_batch_size: int = (
        0  # samples per optimizer step over all GPUs; 0 = micro × GPUs × grad_accum
    )
    grad_accum: int = 1  # used when global_batch_size is 0
    max_steps: int = 100  # optimizer steps
    lr: float = 1e-4  # peak learning rate (after warm-up)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr × this
    warmup_steps: int = 10  # linear warm-up from 0
    weight_decay: float = 0.0  # not applied to biases and norms
    betas: tuple[float, float] = (0.9, 0.95)  # Adam's (beta1, beta2), each in [0, 1)
    grad_clip: float = 1.0  # 0 = off
    eval_every: int = 0  # optimizer steps between val-loss evaluations; 0 = only at the end
    eval_batches: int = 0  # micro-batches per evaluation; 0 = the whole val split
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (older ones deleted after a successful save)
    resume: str = "auto"  # auto (latest in output_dir if any) | never | a checkpoint folder
    log_every: int = 1  # optimizer steps between metrics lines (each reads the losses back)
    max_skipped_in_a_row: int = 20  # fp16 overflow: stop after this many skipped steps in a row
    cpu_shm_comm: bool = False  # CPU runs: build DeepSpeed's shared-memory comm op (~45 s compile)
    tensorboard: bool = True  # also write TensorBoard events beside metrics.jsonl
    oom_retry: bool = False  # on CUDA OOM: halve micro-batch, replay the step exactly (autotune.md)
    # Adam implementation: false = torch's AdamW through DeepSpeed (no compiled op, works on a
    # pip-only install); true = DeepSpeed's FusedAdam (GPU) / DeepSpeedCPUAdam (offload), which
    # compile on first use and need nvcc + CUDA_HOME (docs/training.md: how to pre-build them)
    deepspeed_adam: bool = False
    # nodes without a shared filesystem: each node writes its own ranks' checkpoint shards under
    # its own output_dir (DeepSpeed's node-local storage); docs/training.md "Scaling out"
    node_local_checkpoints: bool = False


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"  # run directory: checkpoints/, hf/, metrics.jsonl, plots
    seed: int = 0  # every rank: weights, dropout, data order, negative-frame subsampling

    def validate(self) -> list[str]:
        """Every problem at once (litgpt style), empty when the config is usable."""
        problems = []
        if self.data.span_policy not in ("error", "repair", "clip"):
            problems.append(
                f"data.span_policy must be error|repair|clip, got {self.data.span_policy!r}"
            )
        if not 0 < self.data.negative_frame_keep <= 1:
            problems.append("data.negative_frame_keep must be in (0, 1]")
        k = self.model.tokens_per_frame
        if k < 1 or int(k**0.5) ** 2 != k:
            problems.append(f"model.tokens_per_frame must be a perfect square, got {k}")
        for key, value, allowed in (
            ("model.dtype", self.model.dtype, ("auto", "fp16", "bf16", "fp32")),
            ("model.cpu_dtype", self.model.cpu_dtype, ("fp32", "bf16")),
            ("model.attention", self.model.attention, ATTENTIONS),
        ):
            if value not in allowed:
                problems.append(f"{key} must be {'|'.join(allowed)}, got {value!r}")
        for key, value in (
            ("model.lora_dropout", self.model.lora_dropout),
            ("loss.focal_alpha", self.loss.focal_alpha),
            ("train.min_lr_ratio", self.train.min_lr_ratio),
        ):
            if not 0 <= value <= 1:
                problems.append(f"{key} must be in [0, 1], got {value}")
        if not all(0 <= b < 1 for b in self.train.betas):
            problems.append(f"train.betas must be two numbers in [0, 1), got {self.train.betas}")
        if not (math.isfinite(self.train.lr) and self.train.lr > 0):
            problems.append(f"train.lr must be a positive number, got {self.train.lr}")
        if self.model.vision_chunk_frames < 0:
            problems.append("model.vision_chunk_frames must be >= 0 (0 = all frames at once)")
        if self.loss.decision_loss not in ("focal", "bce"):
            problems.append("loss.decision_loss must be focal|bce")
        if self.model.qlora and not self.model.lora:
            problems.append("model.qlora needs model.lora=true")
        if self.model.qlora and not self.model.pretrained:
            problems.append(
                "model.qlora needs model.pretrained=true (4-bit weights are made "
                "from a pretrained checkpoint)"
            )
        if self.model.qlora and self._zero_stage() == 3:
            problems.append(
                "model.qlora=true cannot run under ZeRO-3 "
                f"(train.ds_config={self.train.ds_config}): ZeRO-3 partitions every "
                "parameter and bitsandbytes' packed 4-bit weights cannot be partitioned; "
                "use ds_configs/zero2.json (the 4-bit base is small already)"
            )
        t = self.train
        if t.micro_batch_size < 1 or t.grad_accum < 1 or t.max_steps < 1:
            problems.append(
                "train.micro_batch_size, train.grad_accum, train.max_steps must be >= 1"
            )
        if t.resume not in ("auto", "never") and not t.resume:
            problems.append("train.resume must be auto, never or a checkpoint folder")
        return problems

    def _zero_stage(self) -> int | None:
        """ZeRO stage of the DeepSpeed template (None when it cannot be read: path_problems
        reports a missing one)."""
        import json

        from dst_train.engine.ds_config import resolve_template_path

        try:
            text = resolve_template_path(self.train.ds_config).read_text()
            return int(json.loads(text).get("zero_optimization", {}).get("stage", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            return None

    def path_problems(self, check_feature_cache: bool = True) -> list[str]:
        """Every missing input on disk at once (dataset root and splits, a local model folder, the
        DeepSpeed template, the feature cache, an explicit resume folder), so a launch fails in
        seconds instead of after the model is built. Empty when all are there.
        ``check_feature_cache=False`` for the job that builds the cache."""
        from dst_train.data.dataset import DatasetPaths
        from dst_train.engine.checkpoint import COMPLETE
        from dst_train.engine.ds_config import resolve_template_path
        from dst_train.model.backbone import missing_model_folder

        problems = []
        try:
            paths = DatasetPaths.from_root(self.data.root)
            for split in (self.data.train_split, self.data.val_split):
                paths.split_file(split)
        except ValueError as e:
            problems.append(f"data.root={self.data.root}: {e}")
        missing = missing_model_folder(self.model.arch)
        if missing:
            problems.append(f"model.arch={missing}")
        try:
            resolve_template_path(self.train.ds_config)
        except FileNotFoundError as e:
            problems.append(f"train.ds_config: {e}")
        cache = self.data.feature_cache
        if check_feature_cache and cache and not Path(cache).is_dir():
            problems.append(f"data.feature_cache={cache}: no such folder")
        resume = self.train.resume
        if resume not in ("auto", "never") and not (Path(resume) / COMPLETE).is_file():
            problems.append(f"train.resume={resume}: not a complete checkpoint (no {COMPLETE})")
        return problems

    def grad_accum(self, world_size: int) -> int:
        """Accumulation steps that keep the global batch at ``train.global_batch_size``."""
        t = self.train
        if not t.global_batch_size:
            return t.grad_accum
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"micro_batch_size × GPUs = {per_step}"
            )
        return t.global_batch_size // per_step

    def head_config(self):
        from dst_train.model.dst_model import HeadConfig

        lc = self.loss
        return HeadConfig(
            tokens_per_frame=self.model.tokens_per_frame,
            head_hidden=self.model.head_hidden,
            decision_loss=lc.decision_loss,
            focal_alpha=lc.focal_alpha,
            focal_gamma=lc.focal_gamma,
            text_focal_gamma=lc.text_focal_gamma,
            speak_weight=lc.speak_weight,
            update_weight=lc.update_weight,
            response_weight=lc.response_weight,
            dst_weight=lc.dst_weight,
        )


# --------------------------------------------------------------- loading
def load_config(
    path: str | Path | None = None, overrides: list[str] = (), cls: type = RunConfig
) -> Any:
    """Build ``cls`` from a YAML file (optional) and ``key.sub=value`` overrides."""
    raw: dict = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 (byte {e.start})") from None
        raw = _parse_yaml(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value")
        _set_dotted(
            raw, key.strip(), _parse_yaml(value, f"override {item!r:.80}") if value.strip() else ""
        )
    cfg = _build(cls, raw, where=str(path or "config"))
    problems = cfg.validate() if hasattr(cfg, "validate") else []
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return cfg


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: invalid YAML: {e}") from None
    except (ValueError, RecursionError) as e:  # an int of >4300 digits, nesting too deep
        raise ConfigError(f"{where}: invalid YAML: {type(e).__name__}: {e}"[:300]) from None


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: dict, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(repr(k) if not isinstance(k, str) else k for k in set(raw) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(hint)
        if origin is tuple and args and Ellipsis not in args:  # a fixed-length tuple
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {list(value)!r}")
            return tuple(_coerce(a, v, where) for a, v in zip(args, value, strict=True))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, where) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is Any:
        return value
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if hint in (int, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if hint is int and isinstance(value, float):
            raise ConfigError(f"{where}: expected int, got {value!r}")
        # every number in the config is a count, rate or factor: finite and non-negative, and an
        # int fits the 32 bits the libraries below take (numpy seeds, DataLoader workers, ...)
        if (isinstance(value, float) and not math.isfinite(value)) or not 0 <= value <= MAX_INT:
            shown = f"{value:.6g}" if isinstance(value, float) else f"{value!r:.40}"
            raise ConfigError(f"{where}: expected a finite number in [0, {MAX_INT}], got {shown}")
        return hint(value)
    if not isinstance(value, hint) or hint in (int, float):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r:.80}")
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")


SECTIONS = (("", RunConfig), ("data", DataConfig), ("model", ModelConfig),
            ("loss", LossConfig), ("train", TrainConfig))  # fmt: skip


def reference() -> str:
    """Every option as a Markdown table (key, type, default, meaning), read from the dataclasses
    above: the meaning is a field's own comment and the comment lines just above it. This is
    docs/configuration.md (``make docs`` writes it; a test keeps the two equal)."""
    comments = _field_comments()
    lines = [
        "# Run configuration",
        "",
        "Every option of a run (`dst-train train|autotune|cache-features --config RUN.yaml "
        "key=value ...`). Written by `make docs` from `dst_train/config.py`, the one place the "
        "options are defined; edit that file, not this one.",
    ]
    for prefix, cls in SECTIONS:
        lines += ["", f"## {prefix or 'top level'}", "", "| option | type | default | meaning |"]
        lines.append("|---|---|---|---|")
        for f in dataclasses.fields(cls):
            if f.name in {p for p, _ in SECTIONS}:
                continue  # a section of its own
            default = f.default_factory() if callable(f.default_factory) else f.default
            key = f"{prefix}.{f.name}" if prefix else f.name
            meaning = comments.get((cls.__name__, f.name), "").replace("|", "\\|")
            lines.append(f"| `{key}` | `{f.type}` | `{json.dumps(default)}` | {meaning} |")
    return "\n".join(lines) + "\n"


def _field_comments() -> dict[tuple[str, str], str]:
    """{(class, field): its comment}: the comments on the field's own lines, after the comment
    block right above it."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text(encoding="utf-8")
    on_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and "fmt:" not in tok.string:
            on_line[tok.start[0]] = tok.string.lstrip("#").strip()
    text_lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign):
                continue
            above, n = [], item.lineno - 1
            while n >= 1 and text_lines[n - 1].lstrip().startswith("#"):
                above.insert(0, on_line.get(n, ""))  # a "fmt:" pragma is no documentation
                n -= 1
            own = [on_line[k] for k in range(item.lineno, item.end_lineno + 1) if k in on_line]
            out[(node.name, item.target.id)] = " ".join(c for c in above + own if c)
    return out
