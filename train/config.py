"""The trainer's configuration schema: one dataclass per concern, a docstring per field.

Loaded with ``common.config_loader.load_config(TrainConfig, yaml, ["key=value", ...])``; pretraining and
fine-tuning differ only in these values (the loss composition included), never in code paths.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from common.errors import ConfigError
from common.validation import Choice, Range, Rule, check_bounds
from common.paths import CONFIGS
from train.data.config import DataConfig, DataSource, source_name  # noqa: F401 (the schema's data section)

CONFIG_DIR = CONFIGS / "model"
"""This project's open_clip model configs (registered with open_clip by name)."""


@dataclass
class ModelConfig:
    name: str = "tiny_vit"
    """open_clip model name (ViT-B-32, RN50, ...) or the stem of a JSON file in configs/model/."""
    config_file: Optional[str] = None
    """Path of an open_clip model-config JSON. open_clip registers it under its file stem, so when it is
    set the model *is* that stem and ``name`` is replaced by it (a YAML's ``name`` never shadows it)."""
    pretrained: Optional[str] = None
    """Initial weights: a local file (open_clip state dict or this trainer's export) or an open_clip tag."""
    force_image_size: Optional[int] = None
    """Override the config's image size (e.g. 64 px for CPU benchmarks of built-in models)."""
    aug_scale_min: float = 0.9
    """Lower bound of RandomResizedCrop's area scale in the train transform (open_clip default 0.9)."""
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments passed to open_clip's model constructor (patch dropout: ``patch_dropout``)."""
    grad_checkpointing: bool = False
    """Recompute each transformer block in backward instead of keeping its activations (open_clip_train's
    --grad-checkpointing): the same math, less activation memory, one more forward per block (BENCHMARKS.md)."""
    patch_dropout: float = 0.0
    """FLIP: fraction of image patch tokens dropped at random per image while training, in [0, 1) (open_clip's
    force_patch_dropout; the paper uses 0.5-0.75). Training only: eval mode and the export keep every patch."""
    lock_image: bool = False
    """LiT: freeze the image tower (open_clip_train's --lock-image); frozen weights are left out of the optimizer."""
    lock_image_unlocked_groups: int = 0
    """With lock_image: leave the last N layer groups of the image tower trainable (--lock-image-unlocked-groups)."""
    lock_image_freeze_bn_stats: bool = False
    """With lock_image: also freeze BatchNorm statistics of the locked groups (--lock-image-freeze-bn-stats)."""
    lock_text: bool = False
    """Freeze the text tower (open_clip_train's --lock-text); frozen weights are left out of the optimizer."""
    lock_text_unlocked_layers: int = 0
    """With lock_text: leave the last N layers of the text tower trainable (--lock-text-unlocked-layers)."""
    lock_text_freeze_layer_norm: bool = True
    """With lock_text: freeze LayerNorms too (--lock-text-freeze-layer-norm); false works only for Hugging Face
    text towers (open_clip's own text transformer supports only true)."""

    def __post_init__(self) -> None:
        # Normalisation, not a check (validate() checks): the config file's stem *is* the model's name.
        if self.config_file:
            self.name = Path(self.config_file).stem

    def validate(self, prefix: str = "model.") -> None:
        if self.config_file and not Path(self.config_file).is_file():
            raise ConfigError(f"{prefix}config_file: no such file: {self.config_file}")
        check_bounds(self, {"force_image_size": Range(low=1), "aug_scale_min": Range(low=0, high=1, low_open=True),
                            "patch_dropout": Range(low=0, high=1, high_open=True),
                            "lock_image_unlocked_groups": Range(low=0), "lock_text_unlocked_layers": Range(low=0)},
                     prefix)
        if self.patch_dropout > 0 and "force_patch_dropout" in self.model_kwargs:
            raise ConfigError(f"{prefix}patch_dropout={self.patch_dropout} and {prefix}model_kwargs."
                              f"force_patch_dropout={self.model_kwargs['force_patch_dropout']} both set patch dropout: "
                              f"keep only {prefix}patch_dropout")



COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")
"""torch.compile backends run.compile_backend may name (torch._dynamo.list_backends plus its debug ones)."""
MIX_TERMS = ("m2mix", "vmix", "lmix", "vlmix")
MIX_SCHEDULES = ("constant", "inverse_epoch")


@dataclass
class LossConfig:
    cyclip_in_modal: float = 0.0
    """λ₁: weight of CyCLIP's in-modal term C_in (CyCLIP trains with 0.25 at N = 512)."""
    cyclip_cross_modal: float = 0.0
    """λ₂: weight of CyCLIP's cross-modal term C_cross (CyCLIP trains with 0.25 at N = 512)."""
    cyclip_reference_batch: Optional[int] = None
    """Global batch N_ref at which λ₁, λ₂ are stated; the applied weights are λ·N_ref/N, so the terms act
    as N_ref × (mean over the N² pairs) and their gradient share next to the CLIP loss does not grow with
    N (BENCHMARKS.md, losses). None = λ as given at every N (the paper's form). CyCLIP tuned 0.25 at 512."""
    clip_logit_scale: Optional[float] = None
    """Fixed multiplier s for the CLIP term and V/L/VL-Mix instead of the model's learned exp(logit_scale)
    (m²-Mix's reference fine-tunes with τ = 0.01, i.e. 100); the learned scale then gets a zero gradient."""
    m2mix_weight: float = 0.0
    """w: weight of the m²-Mix term. This loss averages the image and text cross-entropies where the
    reference sums them, so the reference's default 0.01 is 0.02 here (its sweep 0.001-0.05 is 0.002-0.1)."""
    m2mix_alpha: float = 0.5
    """α of the m²-Mix λ ~ Beta(α, α) (the reference's --beta2; 0.5 in its m²-Mix script)."""
    m2mix_logit_scale: Optional[float] = None
    """Multiplier s₂ = 1/τ₂ for the m²-Mix logits (the reference's --sep_scale uses 1/0.07); None = CLIP's s."""
    vmix_weight: float = 0.0
    """Weight of V-Mix (images mixed with images, soft targets; the reference's m³-Mix script uses 0.05)."""
    vmix_alpha: float = 0.5
    """α of V-Mix's own λ ~ Beta(α, α) (the reference's --betavariate)."""
    lmix_weight: float = 0.0
    """Weight of L-Mix (texts mixed with texts, soft targets)."""
    lmix_alpha: float = 0.5
    """α of L-Mix's own λ (the reference's --betavariate, shared with V-Mix there)."""
    vlmix_weight: float = 0.0
    """Weight of VL-Mix (both modalities mixed with the same λ)."""
    vlmix_alpha: float = 0.5
    """α of VL-Mix's own λ (the reference's --beta1)."""
    mix_weight_schedule: str = "constant"
    """``constant`` or ``inverse_epoch``: all mixing weights × 1/(epoch+1), the reference's --schedule."""
    schedule_epoch_steps: int = 0
    """Optimizer steps per epoch for ``inverse_epoch`` (samples per epoch / global batch); epoch =
    step // this, counted by the objective's draw_lambda (once per step) and checkpointed with it."""

    def validate(self, prefix: str = "loss.") -> None:
        """ConfigError naming ``{prefix}{key}`` and its value (the keys live under the ``loss`` section)."""
        bounds = {key: Range(low=0) for key in vars(self) if key.endswith(("_weight", "_modal"))}
        bounds.update({f"{t}_alpha": Range(low=0, low_open=True) for t in MIX_TERMS})
        bounds.update(m2mix_logit_scale=Range(low=0, low_open=True), clip_logit_scale=Range(low=0, low_open=True),
                      cyclip_reference_batch=Range(low=1), schedule_epoch_steps=Range(low=0),
                      mix_weight_schedule=Choice(MIX_SCHEDULES))
        check_bounds(self, bounds, prefix)
        if self.mix_weight_schedule == "inverse_epoch" and self.schedule_epoch_steps < 1:
            raise ConfigError(f"{prefix}schedule_epoch_steps={self.schedule_epoch_steps}: "
                              f"{prefix}mix_weight_schedule=inverse_epoch needs >= 1 (optimizer steps per epoch)")

    @property
    def mixes(self) -> bool:
        return any(getattr(self, f"{t}_weight") > 0 for t in MIX_TERMS)

    def cyclip_factor(self, global_rows: int) -> float:
        """N_ref / N, the factor on λ₁, λ₂ at global batch N (1 without a reference batch)."""
        return 1.0 if self.cyclip_reference_batch is None else self.cyclip_reference_batch / global_rows

    def mix_weight_factor(self, step: int) -> float:
        """Factor on every mixing weight at 0-based optimizer ``step``: 1, or 1/(epoch+1) (reference --schedule)."""
        if self.mix_weight_schedule == "constant":
            return 1.0
        return 1.0 / (1 + step // self.schedule_epoch_steps)




@dataclass
class OptimConfig:
    steps: int = 40
    """Total optimizer steps of the run."""
    lr: float = 5e-4
    """Peak learning rate (after warmup)."""
    min_lr: float = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 5
    """Linear warmup steps from 0 to ``lr``."""
    weight_decay: float = 0.2
    """AdamW weight decay on weight matrices (never on gains, biases or logit_scale)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.98
    """AdamW beta2."""
    eps: float = 1e-6
    """AdamW epsilon."""
    fused_adamw: bool = True
    """torch's fused AdamW kernel (CPU and CUDA): one pass over the flat ZeRO partition instead of ~12
    element-wise passes. Measured 8x faster per optimizer step on CPU; false = the per-op reference."""
    grad_clip: float = 1.0
    """Global gradient-norm clipping threshold (0 disables)."""
    max_logit_scale: float = 100.0
    """Upper bound of exp(logit_scale) (CLIP's clamp)."""
    max_nonfinite_steps: int = 5
    """Abort after this many consecutive steps with a NaN/inf loss (each one is skipped and counted)."""


@dataclass
class ZeroConfig:
    stage: int = 1
    """ZeRO stage 0-3 (0 = plain data parallel)."""
    precision: str = "auto"
    """'auto' (bf16 on GPU, fp32 on CPU), 'bf16' or 'fp32'. The losses always run in fp32."""
    bf16_mode: str = "autocast"
    """How bf16 runs. 'autocast' = DeepSpeed's torch_autocast section: fp32 weights, gradients and residual
    stream, bf16 matmuls/convs and bf16 gradient reduction of their weights (open_clip_train's
    --precision amp_bf16). 'weights' = DeepSpeed's bf16 section: bf16 weights, activations and gradients,
    fp32 master weights and Adam state (less memory; the trainer casts images to bf16). autocast is the
    default because the CyCLIP terms, differences of similarities, lose their precision when the features
    themselves are bf16: first-step C_cross 44% off fp32 with bf16 weights, 1.6% with autocast (docs/TRAINING.md)."""
    overlap_comm: bool = False
    """Overlap gradient reduction with backward (worth it on GPU)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 50_000_000
    """Elements per parameter all-gather bucket (stages 1-2)."""
    offload_optimizer: bool = False
    """Stage 2/3: keep optimizer states in CPU memory."""


@dataclass
class CheckpointConfig:
    every_steps: int = 20
    """Save a sharded checkpoint every this many optimizer steps (and always at the end)."""
    keep_last: int = 2
    """Complete checkpoints to keep (older ones are deleted after a newer one is complete); 0 keeps all."""
    export: bool = True
    """Write RUN_DIR/export/ at the end of training: open_clip's hub layout (open_clip_config.json +
    open_clip_model.safetensors; train/model/hub.py), loadable as ``local-dir:RUN_DIR/export``."""
    remote: str = ""
    """Copy of the checkpoints on an object store (any fsspec URL, e.g. s3://bucket/prefix; open_clip_train's
    --remote-sync): rank 0 uploads each complete checkpoint to REMOTE/checkpoints/<name>/ in a background thread,
    then REMOTE/checkpoints/latest; run.resume=latest in a run_dir without checkpoints downloads what that names
    (train/core/remote_checkpoint.py). Empty = off."""
    storage_options: Dict[str, Any] = field(default_factory=dict)
    """fsspec options for ``remote``, e.g. {client_kwargs: {endpoint_url: http://127.0.0.1:8333}, key: ..., secret: ...}
    for an S3-compatible store (s3fs also honours AWS_* environment variables)."""
    remote_retries: int = 3
    """Extra attempts for a failing upload of one file (exponential backoff) before that checkpoint's upload is
    given up (one log line; training goes on, the remote keeps its previous latest)."""
    remote_retry_backoff_s: float = 1.0
    """First upload retry delay in seconds; doubles on every further attempt."""


def check_templates(templates: List[str], key: str) -> None:
    """ConfigError naming ``key`` unless every zero-shot prompt template has a slot for the class name."""
    if any("{}" not in t and "{c}" not in t for t in templates):
        raise ConfigError(f"{key}: every template needs a '{{}}' (or '{{c}}') for the class name")


@dataclass
class ZeroShotSet:
    """A classification set the trainer evaluates zero-shot while it trains (open_clip_train's --imagenet-val).
    Its top-1, top-5 and mean per-class recall go to metrics.jsonl, TensorBoard and wandb as
    ``zeroshot/{name}/top1`` etc. Every rank takes part (under ZeRO-3 a forward needs all of them)."""

    name: str = ""
    """Label of the results (letters, digits, ``_-.``), e.g. ``imagenet``."""
    path: str = ""
    """The dataset, local or remote: CLIP_benchmark's webdataset format (e.g. ImageNet-1k's wds/imagenet1k) or
    this project's dataset folder with labels and classnames.txt (train/evaluate/datasets.py)."""
    split: str = "test"
    """Split to evaluate (CLIP_benchmark calls ImageNet's validation set ``test``)."""
    every_steps: int = 0
    """Evaluate when the step is a multiple of this, and at the last step (0 = only at the last step). A pure
    function of the step, so a resumed run evaluates at the same steps as an uninterrupted one."""
    max_samples: int = 1000
    """Evaluate on the first N samples of the split (0 = all): this bounds each evaluation's cost."""
    templates: List[str] = field(default_factory=list)
    """Prompt templates (``{}`` or ``{c}`` = class name); empty = the dataset's own, else the evaluator's default."""
    batch_size: int = 128
    """Images or prompts per forward pass."""
    storage_options: Dict[str, Any] = field(default_factory=dict)
    """fsspec options for a remote ``path`` (e.g. an S3 endpoint and keys); empty = fsspec's defaults."""

    def due(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.every_steps > 0 and step % self.every_steps == 0)


@dataclass
class WandbConfig:
    """Weights & Biases tracking (open_clip_train's --report-to wandb), on rank 0, beside metrics.jsonl."""

    project: str = ""
    """wandb project; empty = wandb off."""
    entity: str = ""
    """wandb entity (team or user); empty = your default."""
    name: str = ""
    """Display name of the run; empty = the run folder's name."""
    tags: List[str] = field(default_factory=list)
    """Tags of the run."""
    mode: str = "offline"
    """``offline`` (the default: nothing leaves the machine; ``wandb sync RUN_DIR/wandb/offline-run-*`` uploads
    later), ``online``, or ``disabled``. A resumed or requeued run continues the same wandb run (its id is kept
    in RUN_DIR/wandb_run_id)."""


@dataclass
class LoggingConfig:
    every_steps: int = 1
    """Write metrics.jsonl / TensorBoard every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard scalars under RUN_DIR/tensorboard."""
    progress_bar: bool = True
    """tqdm bar on rank 0 (samples/s and loss terms)."""
    log_sample_keys: bool = False
    """Write RUN_DIR/sample_keys/rank{R}.jsonl: {step, keys} per step and rank (steps redone after a crash
    appear again further down; the last occurrence is the one the final weights saw)."""
    eval_every_steps: int = 0
    """Run train/evaluate/periodic.py (zero-shot, retrieval, alignment) every this many steps (0 = never)."""
    eval_split: str = "val"
    """Split of data.path (of the first of data.sources in a mixture) the periodic evaluation reads."""
    eval_max_samples: int = 512
    """Samples of that split the periodic evaluation uses."""
    zeroshot: List[ZeroShotSet] = field(default_factory=list)
    """Classification sets evaluated zero-shot during training, e.g.
    ``[{name: imagenet, path: /data/wds_imagenet1k, every_steps: 2000, max_samples: 10000}]``."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    """Weights & Biases (off unless ``logging.wandb.project`` is set)."""


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    """Output folder: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, export/."""
    seed: int = 0
    """Seed of the data order, augmentations, model init and the mixup lambda sampler."""
    resume: str = ""
    """'' or 'none' starts fresh (removing RUN_DIR's old checkpoints); 'latest' continues this run from
    RUN_DIR/checkpoints/latest (fresh if none; refused if a key of RESUME_KEYS in train/core/preflight.py differs
    from the checkpoint's config); or a checkpoint dir (e.g. fine-tuning from another run: not compared)."""
    device: str = "auto"
    """'auto' (cuda if available, else cpu), 'cpu' or 'cuda'."""
    stop_after_steps: int = 0
    """Stop (with a checkpoint) after this many steps of *this process*, as a time-limited job would (0 = off)."""
    compile: bool = False
    """torch.compile the model in place (open_clip_train's --torchcompile; nn.Module.compile, so checkpoints and
    the export keep plain keys). The first step pays the compilation (tiny model, CPU, inductor: ~42 s)."""
    compile_backend: str = "inductor"
    """torch.compile backend with run.compile: inductor (generated kernels), aot_eager or eager (debugging,
    fast to compile), cudagraphs."""
    cpu_allocator_cache: bool = True
    """CPU runs only (glibc): keep freed memory in the heap instead of returning every large buffer to the OS
    (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=1 GiB), so the per-step gradient, flatten and norm buffers are
    not page-faulted in again at every step. Resident memory then stays at its peak; false = glibc defaults."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Which open_clip model and its initial weights."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the shards are and how batches are formed."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss composition (CLIP, CyCLIP regularisers, m2-Mix terms)."""
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    """DeepSpeed ZeRO settings."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Sharded checkpoints and the final export."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, TensorBoard, progress bar."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run folder, seed, resume."""

    RENAMED: ClassVar[Dict[str, str]] = {"data.partitions": "data.streams"}
    """Old dotted key -> its new name; an old key is refused in one line naming the new one. ("partitions"
    meant these loader streams here and hash buckets in the ingestion schema.)"""

    BOUNDS: ClassVar[Dict[str, Rule]] = {
        "data.global_batch_size": Range(low=1), "data.accum_freq": Range(low=1), "data.num_workers": Range(low=0),
        "data.streams": Range(low=0), "data.shuffle_window": Range(low=1), "data.max_substitutions": Range(low=0),
        "data.cache_limit_gb": Range(low=0, low_open=True), "data.retries": Range(low=0),
        "data.retry_backoff_s": Range(low=0),
        "optim.steps": Range(low=1), "optim.lr": Range(low=0, low_open=True), "optim.min_lr": Range(low=0),
        "optim.warmup_steps": Range(low=0), "optim.weight_decay": Range(low=0),
        "optim.beta1": Range(low=0, high=1, high_open=True), "optim.beta2": Range(low=0, high=1, high_open=True),
        "optim.eps": Range(low=0, low_open=True), "optim.grad_clip": Range(low=0),
        "optim.max_logit_scale": Range(low=0, low_open=True), "optim.max_nonfinite_steps": Range(low=1),
        "zero.stage": Choice((0, 1, 2, 3)), "zero.precision": Choice(("auto", "bf16", "fp32")),
        "zero.bf16_mode": Choice(("weights", "autocast")),
        "zero.reduce_bucket_size": Range(low=1), "zero.allgather_bucket_size": Range(low=1),
        "checkpoint.every_steps": Range(low=1), "checkpoint.keep_last": Range(low=0),
        "logging.every_steps": Range(low=1), "logging.eval_every_steps": Range(low=0),
        "logging.eval_max_samples": Range(low=1), "logging.wandb.mode": Choice(("offline", "online", "disabled")),
        "run.stop_after_steps": Range(low=0), "run.device": Choice(("auto", "cpu", "cuda")),
        "run.compile_backend": Choice(COMPILE_BACKENDS),
    }
    """Every field's rule, written once (common/validation.py; NaN/±inf are refused for every number)."""

    def validate(self) -> None:
        """ConfigError (one line naming the key) for any value outside its rule or an inconsistent pair."""
        check_bounds(self, self.BOUNDS)
        self.model.validate("model.")
        self.loss.validate("loss.")
        if self.optim.min_lr > self.optim.lr:
            raise ConfigError(f"optim.min_lr={self.optim.min_lr} must be <= optim.lr={self.optim.lr}")
        self._validate_zeroshot()
        self._validate_sources()

    def _validate_sources(self) -> None:
        names = set()
        for i, source in enumerate(self.data.sources):
            key = f"data.sources[{i}]"
            check_bounds(source, {"weight": Range(low=0, low_open=True)}, f"{key}.")
            if not source.path:
                raise ConfigError(f"{key}.path: the dataset of this source is missing")
            name = source_name(source)
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ConfigError(f"{key}.name={name!r}: give the source a name of letters, digits, '_', '-', '.'")
            if name in names:
                raise ConfigError(f"{key}.name={name}: two sources share this name (set data.sources[i].name)")
            names.add(name)

    def _validate_zeroshot(self) -> None:
        names = set()
        for i, zs in enumerate(self.logging.zeroshot):
            key = f"logging.zeroshot[{i}]"
            check_bounds(zs, {"every_steps": Range(low=0), "max_samples": Range(low=0), "batch_size": Range(low=1)},
                         f"{key}.")
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", zs.name or ""):
                raise ConfigError(f"{key}.name={zs.name!r}: give each set a name of letters, digits, '_', '-', '.'")
            if zs.name in names:
                raise ConfigError(f"{key}.name={zs.name}: two sets share this name")
            names.add(zs.name)
            if not zs.path:
                raise ConfigError(f"{key}.path: the dataset of set '{zs.name}' is missing")
            check_templates(zs.templates, f"{key}.templates")

    def check_world_size(self, world_size: int) -> int:
        """The per-rank batch b = global / world; it must split into accum_freq equal micro-batches."""
        per_rank, rest = divmod(self.data.global_batch_size, world_size)
        if rest or per_rank % self.data.accum_freq:
            raise ConfigError(f"data.global_batch_size={self.data.global_batch_size} must divide into "
                              f"{world_size} ranks x data.accum_freq={self.data.accum_freq} equal micro-batches")
        return per_rank
