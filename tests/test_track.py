"""Experiment tracking: TensorBoard event files read back with TensorBoard's own reader; MLflow's local file
store when the `track` extra is installed."""

import pytest

from tunelab import track
from tunelab.config import TrackConfig


def scalars(folder) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder))
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def test_tensorboard_holds_what_was_logged(tmp_path):
    t = track.open(tmp_path, {"train": {"lr": 1e-3}}, TrackConfig())
    t.log(1, {"train/loss": 2.5, "train/lr": 1e-3, "dev/f1": None})
    t.log(2, {"train/loss": 1.25, "rl/reward": 0.5})
    t.close()
    got = scalars(tmp_path / track.TENSORBOARD_DIR)
    assert got["train/loss"] == [(1, 2.5), (2, 1.25)]
    assert got["train/lr"] == [(1, pytest.approx(1e-3))]
    assert got["rl/reward"] == [(2, 0.5)]
    assert "dev/f1" not in got  # None is skipped, not logged as 0


def test_resumed_tracker_replaces_steps_after_the_checkpoint(tmp_path):
    first = track.open(tmp_path, {}, TrackConfig())
    for step in (1, 2, 3, 4):
        first.log(step, {"train/loss": float(step)})
    first.close()
    again = track.open(tmp_path, {}, TrackConfig(), resume_step=2)  # killed after 4, checkpoint at 2
    for step in (3, 4, 5):
        again.log(step, {"train/loss": 10.0 + step})
    again.close()
    assert scalars(tmp_path / track.TENSORBOARD_DIR)["train/loss"] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0),
                                                                         (5, 15.0)]


def test_other_processes_and_tracking_off_write_nothing(tmp_path):
    for t in (track.open(tmp_path / "a", {}, TrackConfig(), main=False),
              track.open(tmp_path / "b", {}, TrackConfig(tensorboard=False))):
        t.log(1, {"train/loss": 1.0})
        t.close()
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_metric_scalars_flatten_numbers_only():
    m = {"main": 0.5, "micro": {"f1": 0.5, "support": 9}, "confusion": {"labels": ["a"], "matrix": [[1]]},
         "per_type": {"PER": {"f1": 0.25}}}
    assert track.metric_scalars("dev", m) == {"dev/main": 0.5, "dev/micro/f1": 0.5, "dev/per_type/PER/f1": 0.25}


def test_peak_memory_is_reported():
    import torch

    assert track.peak_memory_mb(torch.device("cpu")) > 10


def test_mlflow_local_file_store(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the `track` extra (mlflow-skinny) is not installed")
    settings = TrackConfig(tensorboard=False, mlflow=True, experiment="tests")
    t = track.open(tmp_path, {"train": {"lr": 0.001}, "task": "ner"}, settings)
    t.log(1, {"train/loss": 2.0, "dev/per_type/B-PER?/f1": 0.5})
    t.close()
    run_id = (tmp_path / track.MLFLOW_RUN_FILE).read_text().strip()
    t = track.open(tmp_path, {}, settings, resume_step=1)  # --resume continues the same MLflow run
    t.log(2, {"train/loss": 1.0})
    t.close()
    client = mlflow.tracking.MlflowClient((tmp_path / track.MLFLOW_DIR).resolve().as_uri())
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["task"] == "ner"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")] == [(1, 2.0), (2, 1.0)]
    assert "dev/per_type/B-PER_/f1" in run.data.metrics
