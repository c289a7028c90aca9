"""Hardware-dependent defaults: which precision is fastest here, which device to infer on."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from pstage.core.errors import ConfigError


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where the CPU has native bf16 matrix units (AMX or AVX512-BF16).

    Without them bf16 autocast is emulated, many times slower than fp32 (benchmarks/RESULTS.md#precision),
    so auto falls back to fp32.
    """
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line for line in handle if line.startswith("flags")), "")
    except OSError:
        return False
    return "amx_bf16" in flags.split() or "avx512_bf16" in flags.split()


def cuda_in_use(accelerator: str) -> bool:
    return accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def resolve_precision(precision: str, accelerator: str) -> str:
    """The precision a run trains and predicts with (what run.json and the run's first line say).

    ``auto`` -> bf16-mixed on bf16-capable GPUs/CPUs, 16-mixed on older GPUs, else 32-true.
    ``16-mixed`` off the GPU becomes bf16-mixed, as Lightning itself does (fp16 autocast does not
    run on a CPU), so prediction uses what training used; transformer-engine needs its package
    and a GPU, refused in one line otherwise.
    """
    if precision.startswith("transformer-engine"):
        if not cuda_in_use(accelerator) or importlib.util.find_spec("transformer_engine") is None:
            raise ConfigError(
                f"train.precision={precision} needs a CUDA GPU and NVIDIA's transformer_engine package; "
                "use train.precision=auto (or bf16-mixed)"
            )
        return precision
    if precision == "16-mixed" and not cuda_in_use(accelerator):
        return "bf16-mixed"
    if precision != "auto":
        return precision
    if cuda_in_use(accelerator):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator in ("auto", "cpu") and cpu_has_fast_bf16():
        return "bf16-mixed"
    return "32-true"


def inference_device(accelerator: str) -> torch.device:
    if cuda_in_use(accelerator):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision string (None for full precision)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def is_rank_zero() -> bool:
    """True in the process that writes run outputs (the only process unless DDP is running)."""
    return all(int(os.environ.get(var, "0") or 0) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))
