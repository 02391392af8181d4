"""A training run's life, shared by every recipe: claiming output_dir (and checking a resume against it),
when to save, keeping the best dev weights with patience, restoring them, and publishing the model folder
with its metadata (tunelab.json). Recipes call these in their loops; none imports another recipe's helpers.
"""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from tunelab import config as config_mod
from tunelab import peft as tuning
from tunelab import track
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_text
from tunelab.runtime import is_main
from tunelab.train import checkpoint

META_FILE = "tunelab.json"


def log(msg: str) -> None:
    if is_main():  # one log for a distributed run, not one per process
        tqdm.write(f"[tunelab] {msg}", file=sys.stderr)


# ---- output_dir ----

def prepare_output(out: Path, cfg, resume: bool, overwrite: bool, write: bool = True) -> None:
    """Check that output_dir may take this run; with `write` also clear it (--overwrite) and save the
    resolved config."""
    saved = out / "config.yaml"
    if out.exists() and any(out.iterdir()):
        if overwrite:
            if write:
                shutil.rmtree(out)
        elif resume:
            if (out / "report.json").is_file() and checkpoint.find(out) is None:
                raise TunelabError(f"--resume: the run in {out} has already finished (report.json is there); "
                                   "pass --overwrite to train it again")
            if saved.is_file():
                old = config_mod.flatten(yaml.safe_load(saved.read_text(encoding="utf-8")))
                new = config_mod.flatten(config_mod.to_dict(cfg))
                # tracking settings do not change the training: a resumed run may log elsewhere
                diff = [k for k in new if old.get(k) != new[k] and not k.startswith("track.")]
                if diff:
                    raise TunelabError(f"--resume: the config differs from the one {out} was started with "
                                       f"({', '.join(diff)}); resume with the same recipe and overrides")
        else:
            raise TunelabError(f"output_dir {out} already holds files; pass --resume to continue that run or "
                               "--overwrite to start again (or set output_dir=...)")
    if write:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(saved, config_mod.to_yaml(cfg))


def claim_output(out: Path, cfg, resume: bool, overwrite: bool, dist) -> None:
    """prepare_output for every process of a run: all check (so that all stop alike on a mistake) before the
    main process clears and writes. Call it only once data, model and task are known to be usable, so that a
    run stopped by a mistake leaves nothing in output_dir that would block the corrected rerun."""
    prepare_output(out, cfg, resume, overwrite, write=False)
    dist.barrier()
    if dist.main:
        prepare_output(out, cfg, resume, overwrite)
    dist.barrier()


# ---- selection, patience, save cadence ----

class KeepBest:
    """Model selection on the dev score and early stopping. Its counters (best, best_step, bad_evals,
    stopped_early) live in the run's state dict, so that checkpoints carry them and a resume continues the
    same selection."""

    def __init__(self, state: dict, patience: int | None):
        self.state, self.patience = state, patience
        for key, value in (("best", None), ("best_step", None), ("bad_evals", 0), ("stopped_early", False)):
            state.setdefault(key, value)

    def update(self, value: float, step: int) -> bool:
        """Record a dev score; True when it is the best so far (the caller then saves the best weights)."""
        s = self.state
        improved = s["best"] is None or value > s["best"]
        if improved:
            s["best"], s["best_step"], s["bad_evals"] = value, step, 0
        else:
            s["bad_evals"] += 1
            if self.patience is not None and s["bad_evals"] >= self.patience:
                s["stopped_early"] = True
        return improved

    def note(self, improved: bool) -> str:
        """How a log line about this evaluation ends."""
        s = self.state
        return (" (best)" if improved else f" (best {s['best']:.4f} at step {s['best_step']})") + \
            (" -> early stop" if s["stopped_early"] else "")


def step_limit(total: int, max_steps: int) -> int:
    """The run's optimizer steps: what the epochs give, capped by train.max_steps (0: no cap)."""
    return min(total, max_steps) if max_steps else total


def ask_to_stop(on_eval, state: dict, score: float) -> None:
    """A recipe's on_eval hook after a dev evaluation: a reason it returns stops the run as early stopping
    does (state["stopped_early"], and state["stopped_by"] says why). Patience stops are "patience"."""
    reason = on_eval(state["step"], score) if on_eval is not None else None
    if reason:
        state["stopped_early"], state["stopped_by"] = True, str(reason)
        log(f"step {state['step']}: stopped ({reason})")
    elif state["stopped_early"]:
        state.setdefault("stopped_by", "patience")


class SaveClock:
    """When a resumable checkpoint is due: every `every` steps, or (every = 0) when `minutes` have passed
    since the last save, by the main process's clock (so that all processes agree)."""

    def __init__(self, every: int, minutes: float, dist):
        self.every, self.minutes, self.dist = every, minutes, dist
        self.last = time.perf_counter()

    def due(self, step: int) -> bool:
        if self.every:
            return step % self.every == 0
        return self.dist.agree(time.perf_counter() - self.last > self.minutes * 60)

    def saved(self) -> None:
        self.last = time.perf_counter()


def restore_best(out: Path, model, device, dist, state: dict) -> bool:
    """The best dev weights back into `model` (every process reads what the main process wrote)."""
    dist.barrier()  # the main process's last writes are on disk before any rank reads them
    restored = checkpoint.load_best(out, model, device)
    dist.require_shared(restored, out)
    if restored:
        log(f"restored the best dev weights (step {state['best_step']}, dev {state['best']:.4f})")
    return restored


def clean_up(out: Path) -> None:
    """A finished run keeps its model folder and report, not its resumable state."""
    shutil.rmtree(out / checkpoint.NAME, ignore_errors=True)
    (out / checkpoint.BEST).unlink(missing_ok=True)


# ---- what each step logs ----

def step_record(step: int, loss: float, lr: float, grad_norm, seconds: float, tokens: int, rows: int, device,
                extra: dict | None = None) -> dict:
    """One optimizer step in the report's history: loss, schedule, throughput, memory, and `extra` (loss
    terms and perturbation scalars by name, per-task losses, ...)."""
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "seconds": seconds, "tokens": tokens,
            "samples": rows, "tokens_per_second": tokens / max(1e-9, seconds),
            "samples_per_second": rows / max(1e-9, seconds), "peak_memory_mb": track.peak_memory_mb(device),
            **(extra or {})}


class Pace:
    """Notices a CPU run that has slowed far below its own early speed because another process competes for
    the cores. With two or more torch threads per process, such competition does not halve the speed but can
    cut it to a tenth (OpenMP threads wait at every barrier for a peer the kernel has descheduled; measured in
    docs/benchmarks.md); one thread per process degrades gracefully.

    watch(record) after each optimizer step (a step_record) logs a warning, at most once a run. The
    reference is the median speed of the steps after the first `warmup`; the test is the last `window`
    steps' speed below `slow` of it while either the load average exceeds the cores or this process got well
    under its threads' CPU time. Speed is tokens per second (steps differ in length)."""

    def __init__(self, device, threads: int, warmup: int = 3, window: int = 10, slow: float = 0.4,
                 load=None, cores: int | None = None):
        self.on = getattr(device, "type", str(device)) == "cpu"
        self.threads, self.warmup, self.window, self.slow = threads, warmup, window, slow
        self.load = load or (lambda: os.getloadavg()[0])
        self.cores = cores or os.cpu_count() or 1
        self.rates, self.recent, self.reference, self.warned = [], [], None, False
        self.clock = None

    def watch(self, record: dict) -> None:
        """update(), and the warning (if any) in the log."""
        warning = self.update(record)
        if warning:
            log(f"step {record['step']}: {warning}")

    def update(self, record: dict, wall: float | None = None, cpu: float | None = None) -> str | None:
        """wall/cpu: this process's wall and CPU seconds since the previous update (measured here when not
        given)."""
        if not self.on or self.warned:
            return None
        now = (time.perf_counter(), time.process_time())
        if wall is None:
            wall, cpu = (now[0] - self.clock[0], now[1] - self.clock[1]) if self.clock else (None, None)
        self.clock = now
        rate = record["tokens"] / max(1e-9, record["seconds"])
        if self.reference is None:
            self.rates.append(rate)
            if len(self.rates) == self.warmup + self.window:
                self.reference = sorted(self.rates[self.warmup:])[self.window // 2]
            return None
        self.recent = (self.recent + [(record["tokens"], record["seconds"], wall, cpu)])[-self.window:]
        if len(self.recent) < self.window:
            return None
        now_rate = sum(t for t, *_ in self.recent) / max(1e-9, sum(s for _, s, *_ in self.recent))
        if now_rate >= self.slow * self.reference:
            return None
        load = self.load()
        walls = [w for *_, w, c in self.recent if w is not None]
        share = sum(c for *_, w, c in self.recent if w is not None) / sum(walls) if walls and sum(walls) > 0 else None
        starved = share is not None and share < 0.6 * self.threads
        if load <= self.cores and not starved:
            return None  # slower for a reason of its own (longer sequences, a slow disk), not the cores
        self.warned = True
        cpu_note = f", this process got {share:.1f} CPU-seconds per second for its {self.threads} threads" \
            if share is not None else ""
        return (f"training slowed to {now_rate:,.0f} tokens/s from {self.reference:,.0f} at its start: the load "
                f"average is {load:.1f} on {self.cores} cores{cpu_note}, so another process is competing for the "
                "CPU. " + (f"With {self.threads} torch threads a process can slow to a tenth of its speed when it "
                           "must share the cores; stop the other job, or run each process with train.threads=1"
                           if self.threads > 1 else "Stop the other job, or expect this run to take longer"))


# A record's per-task dicts, as TensorBoard names them (train/loss/NAME, train/weight/NAME).
NESTED = {"tasks": "loss", "weights": "weight"}


def step_scalars(record: dict) -> dict:
    """A step record as tracker scalars (train/...); per-task dicts become train/loss/NAME, train/weight/NAME."""
    out = {}
    for key, value in record.items():
        if key in ("step", "seconds", "tokens", "samples"):
            continue
        if isinstance(value, dict):
            out.update({f"train/{NESTED.get(key, key)}/{n}": v for n, v in value.items()})
        else:
            out[f"train/{key}"] = value
    return out


# ---- the model folder ----

def base_model_name(name: str) -> str:
    """How tunelab.json names the base model: a packaged name as it is, a folder as an absolute path; an
    adapter folder that training continued from, as that adapter's own base (which the new adapter needs)."""
    from tunelab.models import PACKAGED

    if name in PACKAGED:
        return name
    meta = Path(name) / META_FILE
    if meta.is_file():
        saved = json.loads(meta.read_text(encoding="utf-8"))
        if saved.get("adapter"):
            return saved["base_model"]
    return str(Path(name).resolve())


def publish(out: Path, write, meta: dict) -> None:
    """Files are written to a temporary folder and then moved into place, so that a kill never leaves a
    half-written file in `out`. `write(folder)` writes the model files; `meta` becomes tunelab.json."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    for f in tmp.iterdir():
        f.replace(out / f.name)
    tmp.rmdir()


def save_model_folder(out: Path, model, tokenizer, cfg, task) -> None:
    """The model folder. Full, BitFit and head-only runs: weights (safetensors), config with id2label and the
    tokenizer, which plain transformers loads. Adapter runs: the peft adapter (adapter_config.json +
    adapter_model.safetensors, the task head included) with the base config carrying id2label, which plain peft
    loads onto the base model; with tune.merge also the merged full model in OUTPUT_DIR/merged. Both get
    tunelab.json, tunelab's own metadata (the task's own entries: tunelab.tasks.Task.meta)."""
    meta = {**task.meta(), "base_model": base_model_name(cfg.model.name), "tune": cfg.tune.method,
            "tunelab_format": 1}
    adapter = cfg.tune.method in tuning.ADAPTERS
    if adapter:
        meta.update(adapter=True, virtual_tokens=cfg.tune.virtual_tokens)

    def write(folder: Path, m) -> None:
        from tunelab.models import crf

        with crf.detached(m) as chain:  # (the CRF goes beside the transformers weights, not into them)
            m.save_pretrained(str(folder))
        if chain is not None:
            crf.save(chain, folder)
        if adapter and m is model:
            tuning.base_of(model).config.save_pretrained(str(folder))
        tokenizer.save_pretrained(str(folder))

    publish(out, lambda folder: write(folder, model), meta)
    if cfg.tune.merge:
        merged = model.merge_and_unload()  # folds the adapter into the weights, in place
        publish(out / "merged", lambda folder: write(folder, merged), {**meta, "adapter": False, "merged": True})


def read_meta(folder) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise TunelabError(f"{folder}: not a tunelab model folder (no {META_FILE}); train one with `tunelab train`")
    return json.loads(path.read_text(encoding="utf-8"))
