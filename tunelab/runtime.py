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
