"""Experiment tracking: every run's scalars as TensorBoard event files (by default) and optionally in MLflow.

One small component for every recipe:

    tracker = track.open(out_dir, cfg_dict, settings, main=is_main_process)
    tracker.log(step, {"train/loss": 0.41, "train/lr": 3e-5, "dev/f1": None})   # None values are skipped
    tracker.close()

`settings` is the config's `track` section (tensorboard, mlflow, mlflow_uri, experiment). A process other
than the main one gets a tracker that does nothing, so recipes call it unconditionally. Names are
"group/name" ("train/loss", "dev/micro/f1", "rl/reward"); TensorBoard groups its charts by the prefix.

Event files go to OUTPUT_DIR/tensorboard (`tensorboard --logdir runs/` shows every run under runs/). MLflow
logs to `mlflow_uri`, or to a local file store in OUTPUT_DIR/mlruns (offline; MLflow 3 keeps its file store
behind MLFLOW_ALLOW_FILE_STORE, which tunelab sets for file: URIs it is asked to use).
"""

import math
import os
import resource
import sys
from pathlib import Path

from tunelab.errors import TunelabError

TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_RUN_FILE = ".mlflow_run"  # the MLflow run id, so that --resume continues the same MLflow run


class NullTracker:
    def log(self, step: int, scalars: dict) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker:
    """Writes to every backend it was opened with; see `open`."""

    def __init__(self, writers: list):
        self.writers = writers

    def log(self, step: int, scalars: dict) -> None:
        clean = {k: float(v) for k, v in scalars.items() if v is not None and math.isfinite(float(v))}
        if clean:
            for w in self.writers:
                w.log(step, clean)

    def close(self) -> None:
        for w in self.writers:
            w.close()


class _TensorBoard:
    def __init__(self, folder: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: on resume, TensorBoard drops what an earlier process logged at or after this step (the
        # steps between the last checkpoint and a kill are trained and logged again).
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, scalars: dict) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, out: Path, cfg_dict: dict, uri: str | None, experiment: str | None, resume: bool):
        try:
            import mlflow
        except ImportError:
            raise TunelabError("track.mlflow=true needs MLflow: pip install -e '.[track]' (mlflow-skinny), or "
                               "set track.mlflow=false") from None
        uri = uri or (out.resolve() / MLFLOW_DIR).as_uri()
        if uri.startswith("file:"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.mlflow = mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment(experiment or "tunelab")
        id_file = out / MLFLOW_RUN_FILE
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
        if run_id is None:
            from tunelab.io import atomic_write_text

            atomic_write_text(id_file, self.run.info.run_id)
            mlflow.log_params({k: str(v)[:500] for k, v in flatten(cfg_dict, sep=".").items()})

    def log(self, step: int, scalars: dict) -> None:
        # MLflow metric names allow '/', letters, digits, '_', '-', '.', ' '; anything else becomes '_'.
        safe = {"".join(c if c.isalnum() or c in "/_-. " else "_" for c in k): v for k, v in scalars.items()}
        self.mlflow.log_metrics(safe, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def open(out_dir, cfg_dict: dict, settings, main: bool = True, resume_step: int | None = None):
    """A tracker for the run in `out_dir`. `settings`: the config's track section; `main`: False gives a
    tracker that does nothing (the other processes of a distributed run); `resume_step`: the step a resumed
    run continues from (its earlier events after that step are dropped)."""
    if not main or settings is None:
        return NullTracker()
    out = Path(out_dir)
    writers = []
    if settings.tensorboard:
        writers.append(_TensorBoard(out / TENSORBOARD_DIR, resume_step))
    if settings.mlflow:
        writers.append(_MLflow(out, cfg_dict, settings.mlflow_uri, settings.experiment, resume_step is not None))
    return Tracker(writers) if writers else NullTracker()


def flatten(d: dict, prefix: str = "", sep: str = "/") -> dict:
    """{"micro": {"f1": 0.9}} -> {"micro/f1": 0.9}: numbers and strings, lists left out (confusion matrices)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + sep, sep))
        elif isinstance(v, (int, float, str)) or v is None:
            out[key] = v
    return out


def metric_scalars(prefix: str, metrics: dict) -> dict:
    """The numeric leaves of a metrics dict under `prefix` ("dev/main", "dev/micro/f1", ...)."""
    return {f"{prefix}/{k}": v for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.endswith("support")}


def peak_memory_mb(device) -> float:
    """Peak memory of this process so far: CUDA's max allocated on a GPU, else the process's peak resident
    set (getrusage; kilobytes on Linux, bytes on macOS)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
