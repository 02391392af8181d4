"""Where and how a model runs: this process's place in a launched run (rank, world size), the device, and
the precision (bf16 autocast) and mode (eval) it runs in. Everything here is a leaf: no tunelab imports
but errors, so that progress bars, distributed training and inference can all use it."""

import contextlib
import os

import torch

from tunelab.errors import TunelabError


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """The process that logs and writes; decided from the launcher's environment, so usable anywhere."""
    return rank() == 0


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TunelabError(f"train.device={name}: CUDA is not available on this machine; use cpu or auto")
    return torch.device(name)


def fast_bf16(device: str = "auto") -> bool:
    """train.bf16=auto: whether this device computes bf16 natively, so that autocast pays (about 1.5-2x on
    MiniLM training here) instead of emulating it: a CUDA GPU that supports bf16, or an x86 CPU with
    AVX512-BF16 or AMX (Linux reports them in /proc/cpuinfo). Elsewhere float32."""
    name = pick_device(device).type if device == "auto" else device
    if name.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if name != "cpu":
        return False
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_flags() -> list[str]:
    """The CPU's feature flags as Linux lists them (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for inference, and the model's previous mode back afterwards (dev evaluation runs in the
    middle of training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
