"""`tunelab runs` and `tunelab compare`: finished single-task and multi-task runs and an unfinished one."""

import json
import shutil

import pytest

from tunelab import cli


def make_multitask_run(folder):
    """The shape of a multi-task report.json: `dev` is the aggregate, per-task metrics under `tasks`."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("task: multitask\nmodel: {name: m}\ntune: {method: lora}\n"
                                        "train: {lr: 0.001, epochs: 2, seed: 3}\n")
    evals = [{"step": s, "dev": d, "scores": {"ner": d, "topic": d}, "tasks": {"ner": {"main": d, "micro": {"f1": d}},
                                                                              "topic": {"main": d}}}
             for s, d in ((5, 0.4), (10, 0.7))]
    report = {"task": "multitask", "steps": 10, "total_steps": 10, "best_step": 10, "dev": 0.7, "evals": evals,
              "history": [{"step": s, "loss": 1.0 / s, "lr": 0.001, "tasks": {"ner": 2.0 / s}} for s in range(1, 11)],
              "tasks": {"ner": {"test": {"main": 0.65}}, "topic": {"test": {"main": 0.9}}}}
    (folder / "report.json").write_text(json.dumps(report))


def make_unfinished_run(folder):
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "config.yaml").write_text("task: classify\nmodel: {name: m}\ntrain: {lr: 0.01, epochs: 3, seed: 1}\n")
    (folder / "checkpoint" / "state.json").write_text(json.dumps({
        "step": 4, "best": 0.5, "best_step": 4, "history": [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)],
        "evals": [{"step": 4, "dev": 0.5, "metrics": {"main": 0.5}}]}))


@pytest.fixture
def runs_dir(tmp_path, ner_run):
    out, _ = ner_run
    shutil.copytree(out, tmp_path / "ner", ignore=shutil.ignore_patterns("*.safetensors", "tensorboard"))
    make_multitask_run(tmp_path / "group" / "mtl")
    make_unfinished_run(tmp_path / "cls")
    (tmp_path / "notes").mkdir()
    return tmp_path


def test_runs_lists_every_run_with_config_and_best_metrics(runs_dir, ner_run, capsys):
    _, report = ner_run
    assert cli.main(["runs", str(runs_dir), "--json"]) == 0
    rows = {r["run"].split("/")[-1]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"ner", "mtl", "cls"}
    ner = rows["ner"]
    assert (ner["status"], ner["task"], ner["method"], ner["lr"], ner["seed"]) == ("finished", "ner", "full", 3e-3, 42)
    assert ner["dev"] == pytest.approx(report["dev"]["main"]) and ner["test"] == pytest.approx(report["test"]["main"])
    assert rows["mtl"]["dev"] == 0.7 and rows["mtl"]["test"] == {"ner": 0.65, "topic": 0.9}
    assert rows["mtl"]["method"] == "lora"
    assert rows["cls"]["status"] == "unfinished (step 4)" and rows["cls"]["dev"] == 0.5
    assert cli.main(["runs", str(runs_dir)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| run | status | task |") and table.count("\n") == 5  # header, rule, 3 runs


def test_compare_writes_a_table_and_curves(runs_dir, ner_run, tmp_path, capsys):
    _, report = ner_run
    png = tmp_path / "curves.png"
    args = ["compare", str(runs_dir / "ner"), str(runs_dir / "group" / "mtl"), "--metric", "train/loss",
            "--metric", "dev/main", "--out", str(png), "--json"]
    assert cli.main(args) == 0
    ner, mtl = json.loads(capsys.readouterr().out)
    losses = [h["loss"] for h in report["history"]]
    assert ner["train/loss best"] == pytest.approx(min(losses)) and ner["train/loss last"] == pytest.approx(losses[-1])
    assert ner["dev/main best"] == pytest.approx(report["dev"]["main"])
    assert mtl["dev/main best"] == 0.7 and mtl["dev/main last"] == 0.7 and mtl["train/loss last"] == 0.1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # per-task metrics of a multi-task run
    assert cli.main(["compare", str(runs_dir / "group" / "mtl"), "--metric", "dev/ner/micro/f1",
                     "--metric", "test/topic/main"]) == 0
    assert "| 0.7 | 0.7 | 0.9 | 0.9 |" in capsys.readouterr().out


def test_compare_errors_name_what_is_there(runs_dir, capsys):
    assert cli.main(["compare", str(runs_dir / "ner"), "--metric", "dev/f1"]) == 2
    err = capsys.readouterr().err
    assert "no metric dev/f1" in err and "dev/micro/f1" in err and "Traceback" not in err
    assert cli.main(["compare", str(runs_dir / "notes")]) == 2
    assert "is not a tunelab run folder" in capsys.readouterr().err
    assert cli.main(["compare", str(runs_dir)]) == 2
    assert "it holds 3 run(s)" in capsys.readouterr().err
    assert cli.main(["compare", str(runs_dir / "ner"), "--out", "x.jpg"]) == 2
    assert cli.main(["runs", str(runs_dir / "notes")]) == 2
    assert "no runs here" in capsys.readouterr().err
