"""Resumable training state, written so that a kill at any moment leaves a usable checkpoint.

A checkpoint is a folder: model weights (safetensors), optimizer and scheduler state (torch tensors only,
read back with weights_only=True: nothing is unpickled), RNG state and the loop's counters (JSON). It is
written under a temporary name and swapped in by rename.
"""

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunelab.errors import TunelabError
from tunelab.io import atomic_write_json
from tunelab.peft import trainable_state

NAME = "checkpoint"
BEST = "checkpoint-best.safetensors"


def save(run_dir, model, optimizer, scheduler, state: dict, rng: dict | None = None,
         components: dict | None = None) -> None:
    """`rng`: torch RNG states by name (a distributed run's, one per rank: tunelab.distributed.rng_states);
    None: this process's. `components`: name -> object with state_dict() (stateful loss terms, perturbations:
    tunelab.train.step.Step.stateful()); their state is saved beside the optimizer's."""
    run_dir = Path(run_dir)
    tmp, final, old = run_dir / f".{NAME}.tmp", run_dir / NAME, run_dir / f".{NAME}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_weights(model), tmp / "model.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "components": {n: c.state_dict() for n, c in (components or {}).items()}}, tmp / "optim.pt")
    rng = dict(rng or {"torch": torch.get_rng_state()})
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, tmp / "rng.safetensors")
    atomic_write_json(tmp / "state.json", state)
    # Swap: final -> old, tmp -> final, drop old. A kill between the renames leaves `old`, which load() uses.
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find(run_dir) -> Path | None:
    run_dir = Path(run_dir)
    for cand in (run_dir / NAME, run_dir / f".{NAME}.old"):
        if (cand / "state.json").is_file():
            return cand
    return None


def load(path, model, optimizer, scheduler, device, rank: int = 0, components: dict | None = None) -> dict:
    path = Path(path)
    _restore(model, load_file(path / "model.safetensors", device=str(device)), path)
    optim = torch.load(path / "optim.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    saved = optim.get("components", {})
    for name, component in (components or {}).items():
        if name not in saved:
            raise TunelabError(f"{path}: this checkpoint has no state for {name!r}, which this run uses; resume "
                               "with the settings the run was started with, or start again with --overwrite")
        component.load_state_dict(saved[name])
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng.get(f"torch.rank{rank}", rng["torch"]))
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return json.loads((path / "state.json").read_text())


def save_best(run_dir, model) -> None:
    """The best weights so far, kept on disk so that restore-best survives a resume."""
    from tunelab.io import atomic_write_bytes
    from safetensors.torch import save

    atomic_write_bytes(Path(run_dir) / BEST, save(_weights(model)))


def load_best(run_dir, model, device) -> bool:
    path = Path(run_dir) / BEST
    if not path.is_file():
        return False
    _restore(model, load_file(path, device=str(device)), path)
    return True


def _weights(model) -> dict:
    # Only what training changes: with LoRA a checkpoint is the adapter, not a second copy of the model.
    return {k: v.contiguous().cpu() for k, v in trainable_state(model).items()}


def _restore(model, weights: dict, path) -> None:
    result = model.load_state_dict(weights, strict=False)
    missing = set(trainable_state(model)) - set(weights)
    if result.unexpected_keys or missing:
        raise TunelabError(f"{path}: this checkpoint does not fit the model being trained (unexpected "
                           f"{result.unexpected_keys[:3]}, missing {sorted(missing)[:3]}); was tune.* changed? "
                           "Start again with --overwrite")
