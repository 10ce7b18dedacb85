"""What the training step runs on: the device, the optimizer, the DeepSpeed config and the CPU allocator.

Written once for the trainer (DeepSpeed) and for the in-process experiments (a plain module), so both
train with the same AdamW, parameter groups and clipping.
"""
from __future__ import annotations

import torch

from train.config import OptimConfig, TrainConfig
from train.model.build import weight_decay_groups


def pick_device(wanted: str, local_rank: int = 0) -> torch.device:
    """``run.device``: 'cuda' (or 'auto' with CUDA present) selects cuda:local_rank, else the CPU."""
    if wanted == "cuda" or (wanted == "auto" and torch.cuda.is_available()):
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def uses_bf16(precision: str, device: torch.device) -> bool:
    """``zero.precision``: 'bf16', or 'auto' on CUDA."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) over ``weight_decay_groups`` (no decay on gains, biases, logit_scale).

    Unfused, AdamW streams DeepSpeed's flat fp32 partition through memory once per element-wise op, which
    at 1 rank on CPU cost a quarter of the step: ``optim.fused_adamw`` picks torch's fused kernel.
    """
    return torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=cfg.fused_adamw)


def deepspeed_config(cfg: TrainConfig, micro_batch: int, bf16: bool, universal: bool = False) -> dict:
    """The DeepSpeed config dict of ``cfg`` (the one place it is written; DeepSpeed's JSON schema)."""
    zero = {"stage": cfg.zero.stage, "overlap_comm": cfg.zero.overlap_comm, "contiguous_gradients": True,
            "reduce_bucket_size": cfg.zero.reduce_bucket_size}
    if cfg.zero.stage in (1, 2):
        zero["allgather_bucket_size"] = cfg.zero.allgather_bucket_size
    if cfg.zero.offload_optimizer and cfg.zero.stage >= 2:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": cfg.data.global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        # DeepSpeed only sums the micro-batch gradients; the negatives come from feature caching.
        "gradient_accumulation_steps": cfg.data.accum_freq,
        "gradient_clipping": cfg.optim.grad_clip,
        # bf16 weights (the trainer casts images to bf16) or torch autocast over fp32 weights: zero.bf16_mode.
        "bf16": {"enabled": bf16 and cfg.zero.bf16_mode == "weights"},
        "torch_autocast": {"enabled": bf16 and cfg.zero.bf16_mode == "autocast", "dtype": "bfloat16"},
        "zero_optimization": zero,
        # A torch AdamW client optimizer: DeepSpeed's FusedAdam would JIT-compile for minutes on CPU.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": universal},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def keep_freed_memory() -> bool:
    """glibc only: serve large allocations from the heap and keep freed memory there (see
    run.cpu_allocator_cache). Own code rather than jemalloc/tcmalloc: those need LD_PRELOAD before start."""
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
