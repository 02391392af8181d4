"""tunelab search: the space file is checked before any trial, conditional keys are honoured, the pruner stops
trials at their dev evaluations (recorded as pruned), a search killed with kill -9 continues to the requested
number of trials (the killed trial resumes from its checkpoint), two workers share one SQLite study without
running a trial twice, the best recipe YAML reproduces the best trial's dev score, the test split is evaluated
once at the end, and RL refuses."""

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from conftest import ner_overrides

from tunelab import cli, search
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.predict import Predictor
from tunelab.data import read_file
from tunelab.tasks import task_type
from tunelab.train import train

REPO = Path(__file__).resolve().parents[1]
QUICK = {"train.epochs": 2, "train.threads": 1, "train.eval_every": 2, "train.save_every": 1}


def recipe(tmp_path, conll_dir, tiny_model_dir, **extra) -> tuple[Path, list[str]]:
    """An empty recipe file and the overrides of a quick tiny NER run (what a user's recipe would hold)."""
    path = tmp_path / "recipe.yaml"
    path.write_text("task: ner\n")
    return path, ner_overrides(conll_dir, tiny_model_dir, tmp_path / "unused", **{**QUICK, **extra})


def space(tmp_path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def study_of(out: Path):
    return optuna.load_study(study_name="tunelab", storage=f"sqlite:///{out / 'study.db'}")


@pytest.mark.parametrize("text, words", [
    ("train.lr: {type: normal, low: 1, high: 2}", "type must be one of loguniform"),
    ("train.lr: {type: uniform, low: 0.1}", "numeric low and high"),
    ("train.lr: {type: uniform, low: 0.2, high: 0.1}", "low (0.2) must be below high (0.1)"),
    ("train.lr: {type: loguniform, low: 0, high: 0.1}", "a log scale needs low > 0"),
    ("train.lr: {type: uniform, low: 0.1, high: 0.2, scale: 3}", "unknown field(s) scale"),
    ("tune.method: {type: categorical, choices: []}", "needs choices"),
    ("tune.lora_r: {type: int, low: 2, high: 8, when: {tune.method: lora}}\n"
     "tune.method: {type: categorical, choices: [full, lora]}", "comes later in the file"),
    ("train.lrate: {type: uniform, low: 0.1, high: 0.2}", "train.lrate: not a config key"),
    ("tune.method: {type: categorical, choices: [full, bogus]}", "the value 'bogus' is not accepted"),
    ("train.warmup_ratio: {type: uniform, low: 0.5, high: 1.5}", "the value 1.5 is not accepted"),
    ("- train.lr", "maps config keys to distributions"),
])
def test_bad_space_files_stop_before_any_trial(text, words, tmp_path, conll_dir, tiny_model_dir, capsys):
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    argv = ["search", str(path), *overrides, "--space", str(space(tmp_path, text)), "--trials", "2",
            "--out", str(tmp_path / "s")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and str(tmp_path / "space.yaml") in err and "Traceback" not in err
    assert not (tmp_path / "s" / "trials").exists()


def test_rl_and_a_recipe_without_dev_are_refused(tmp_path, conll_dir, tiny_model_dir, capsys):
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}")
    rl = tmp_path / "rl.yaml"
    rl.write_text("task: rl\ndata: {train: p.jsonl}\nrl: {rewards: {length: 1}}\n")
    assert cli.main(["search", str(rl), "--space", str(sp), "--trials", "2", "--out", str(tmp_path / "s")]) == 2
    assert "task: rl has no dev score" in capsys.readouterr().err
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    for url, words in (("mysql://nobody@127.0.0.1:1/x", "driver for this URL is not installed"),
                       ("postgresql+nodriver://x", "cannot open the study's storage"),
                       ("sqlite:////no/such/folder/study.db", "cannot open the study's storage")):
        assert cli.main(["search", str(path), *overrides, "--space", str(sp), "--trials", "2", "--storage", url,
                         "--out", str(tmp_path / "s")]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err, err
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir, **{"data.dev": "null"})
    assert cli.main(["search", str(path), *overrides, "--space", str(sp), "--trials", "2",
                     "--out", str(tmp_path / "s")]) == 2
    assert "selects on dev" in capsys.readouterr().err


def test_conditional_keys_reruns_and_the_test_split_once(tmp_path, conll_dir, tiny_model_dir):
    """Random sampling of tune.method with tune.lora_r only under lora; the top 2 configurations trained again
    with seeds 1 and 2 and the best mean chosen; the test split evaluated on the chosen configuration's models
    only, at the end; trials left their test split alone."""
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    sp = space(tmp_path, "tune.method: {type: categorical, choices: [full, lora]}\n"
                         "tune.lora_r: {type: int, low: 2, high: 8, when: {tune.method: lora}}\n"
                         "tune.target_modules: {type: categorical, choices: [[query, value], [all-linear]], "
                         "when: {tune.method: lora}}\n"
                         "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}\n")
    out = tmp_path / "s"
    opts = search.Options(trials=5, out=out, sampler="random", pruner="none", seed=3, max_steps=4,
                          rerun_top=2, rerun_seeds=(1, 2), quiet=True)
    doc = search.search(path, sp, opts, overrides, log=lambda m: None)

    trials = [t for t in doc["trials"] if t["state"] == "COMPLETE"]
    assert len(trials) == 5 and {t["params"]["tune.method"] for t in trials} == {"full", "lora"}
    for t in trials:
        cfg = load_config(Path(t["folder"]) / "config.yaml")
        assert cfg.tune.method == t["params"]["tune.method"] and cfg.train.lr == t["params"]["train.lr"]
        assert ("tune.lora_r" in t["params"]) == (cfg.tune.method == "lora")
        if cfg.tune.method == "lora":  # a list choice travels as its JSON
            assert cfg.tune.lora_r == t["params"]["tune.lora_r"]
            assert cfg.tune.target_modules == json.loads(t["params"]["tune.target_modules"])
        report = json.loads((Path(t["folder"]) / "report.json").read_text())
        assert report["test"] is None and report["steps"] == 4  # max_steps; no test evaluation in a trial
        assert t["value"] == pytest.approx(max(e["dev"] for e in report["evals"]))

    # reruns: the top 2 by dev, each with its own seed (42) and 1, 2; the choice is the best mean
    top = sorted(trials, key=lambda t: -t["value"])[:2]
    assert sorted({r["trial"] for r in doc["reruns"]}) == sorted(t["number"] for t in top)
    assert sorted(r["seed"] for r in doc["reruns"]) == [1, 1, 2, 2, 42, 42]
    means = {n: statistics.mean(r["dev"] for r in doc["reruns"] if r["trial"] == n) for n in
             {r["trial"] for r in doc["reruns"]}}
    assert doc["chosen"]["trial"] == max(means, key=means.get)
    for r in doc["reruns"]:
        if r["seed"] != 42:
            assert load_config(Path(r["folder"]) / "config.yaml").train.seed == r["seed"]

    # the test split once, on the chosen configuration's three models
    test = read_file(conll_dir / "test.conll", "ner")
    assert len(doc["test"]["runs"]) == 3
    for run in doc["test"]["runs"]:
        metrics = Predictor(run["folder"], "cpu", 64, False).evaluate(test)
        assert run["score"] == pytest.approx(task_type("ner").score(metrics))
    assert doc["test"]["mean"] == pytest.approx(statistics.mean(r["score"] for r in doc["test"]["runs"]))

    md = (out / "search.md").read_text()
    assert f"**Best trial {doc['best']['trial']}**" in md and "Ready recipe: `best.yaml`" in md
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG" and (out / "parallel.png").is_file()
    assert json.loads((out / "search.json").read_text())["chosen"] == doc["chosen"]


class PruneAfterFirst(optuna.pruners.BasePruner):
    """Every trial after trial 0 is pruned at its first report."""

    def prune(self, study, trial) -> bool:
        return trial.number > 0


def test_pruned_trials_stop_early_and_are_recorded_as_pruned(tmp_path, conll_dir, tiny_model_dir):
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}")
    out = tmp_path / "s"
    doc = search.search(path, sp, search.Options(trials=3, out=out, pruner=PruneAfterFirst(), max_steps=8,
                                                 quiet=True), overrides, log=lambda m: None)
    states = [t["state"] for t in doc["trials"]]
    assert states == ["COMPLETE", "PRUNED", "PRUNED"]
    for t in doc["trials"][1:]:
        report = json.loads((Path(t["folder"]) / "report.json").read_text())
        assert report["stopped_early"] and report["stopped_by"] == "pruned by the search"
        assert report["steps"] == 2 < report["total_steps"] == 8  # stopped at the first evaluation (step 2)
        assert t["last_step"] == 2
    assert doc["best"]["trial"] == 0 and "pruned" in (out / "search.md").read_text()


def test_the_best_recipe_reproduces_the_best_dev_score(tmp_path, conll_dir, tiny_model_dir):
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}\n"
                         "train.warmup_ratio: {type: uniform, low: 0.0, high: 0.3}\n")
    out = tmp_path / "s"
    doc = search.search(path, sp, search.Options(trials=3, out=out, pruner="none", max_steps=6, quiet=True),
                        overrides, log=lambda m: None)
    again = train(load_config(out / "best.yaml", ["train.threads=1"]))
    assert max(e["dev"] for e in again["evals"]) == pytest.approx(doc["best"]["value"], abs=1e-9)
    assert again["test"] is not None  # an ordinary run again: its test split is evaluated


def _launch(argv, log):
    return subprocess.Popen([sys.executable, "-m", "tunelab", *argv], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)


def test_a_killed_search_continues_to_the_requested_trials(tmp_path, conll_dir, tiny_model_dir):
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}")
    out = tmp_path / "s"
    argv = ["search", str(path), *overrides, "--space", str(sp), "--trials", "3", "--out", str(out),
            "--pruner", "none", "--max-steps", "12"]
    with open(tmp_path / "first.log", "wb") as log:
        proc = _launch(argv, log)
        deadline = time.monotonic() + 240
        while not (out / "trials" / "0001" / "checkpoint" / "state.json").is_file():  # trial 1 is under way
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = json.loads((out / "trials" / "0001" / "checkpoint" / "state.json").read_text())["step"]
    assert killed_at < 12

    with open(tmp_path / "second.log", "wb") as log:
        assert _launch(argv, log).wait() == 0, (tmp_path / "second.log").read_text()[-3000:]
    trials = study_of(out).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3 and [t.state.name for t in trials].count("FAIL") == 1
    retry = next(t for t in complete if t.system_attrs.get("failed_trial") == 1)
    assert retry.params == trials[1].params and retry.user_attrs["folder"] == str(out / "trials" / "0001")
    assert len({t.user_attrs["folder"] for t in complete}) == 3  # no trial ran twice
    assert "resuming" in (tmp_path / "second.log").read_text()
    report = json.loads((out / "trials" / "0001" / "report.json").read_text())
    assert report["steps"] == 12 and json.loads((out / "search.json").read_text())["complete"]


def test_two_workers_share_one_study_without_running_a_trial_twice(tmp_path, conll_dir, tiny_model_dir):
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}")
    out = tmp_path / "s"
    argv = ["search", str(path), *overrides, "--space", str(sp), "--trials", "4", "--out", str(out),
            "--pruner", "none", "--max-steps", "4", "--workers", "2"]
    with open(tmp_path / "w.log", "wb") as log:
        assert _launch(argv, log).wait() == 0, (tmp_path / "w.log").read_text()[-3000:]
    trials = study_of(out).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert 4 <= len(complete) <= 5 and len(complete) == len(trials)  # at most workers - 1 over
    assert len({t.user_attrs["folder"] for t in complete}) == len(complete)
    assert len({t.user_attrs["pid"] for t in complete}) == 2  # both workers ran trials
    assert len({t.params["train.lr"] for t in complete}) == len(complete)  # and drew different values
    for t in complete:  # each trial's folder was trained once, by its own worker
        report = json.loads((Path(t.user_attrs["folder"]) / "report.json").read_text())
        assert report["steps"] == 4 and load_config(Path(t.user_attrs["folder"]) / "config.yaml").train.threads == 1
    assert (out / "search.md").is_file()


def test_a_multitask_recipe_is_searched_on_its_mean_dev_score(tmp_path, conll_dir, cls_dir, tiny_model_dir):
    from test_multitask import mt_overrides

    path = tmp_path / "mt.yaml"
    path.write_text("task: multitask\n")
    overrides = mt_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "unused", **QUICK)
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}")
    doc = search.search(path, sp, search.Options(trials=2, out=tmp_path / "s", pruner="none", max_steps=4,
                                                 quiet=True), overrides, log=lambda m: None)
    for t in doc["trials"]:
        report = json.loads((Path(t["folder"]) / "report.json").read_text())
        assert t["value"] == pytest.approx(max(e["dev"] for e in report["evals"]))
        assert all(entry["test"] is None for entry in report["tasks"].values())
    assert set(doc["test"]["runs"][0]["tasks"]) == {"ner", "topic"}


def test_space_values_become_overrides_the_config_reads_back():
    assert search.override("tune.target_modules", ["query", "value"]) == 'tune.target_modules=["query", "value"]'
    assert search.override("train.lr", 0.001) == "train.lr=0.001"
    assert search.override("tune.method", "lora") == "tune.method=lora"
    cfg = load_config(None, ["task=ner", "data.train=x", search.override("tune.target_modules", ["query", "value"]),
                             search.override("train.max_steps", 7)])
    assert cfg.tune.target_modules == ["query", "value"] and cfg.train.max_steps == 7
    with pytest.raises(TunelabError, match="train.max_steps"):
        load_config(None, ["task=ner", "data.train=x", "train.max_steps=-1"])


def test_failing_trials_are_recorded_and_three_in_a_row_stop_the_search(tmp_path, conll_dir, tiny_model_dir):
    """A trial whose values the run refuses is failed with its message and the search goes on; three failures
    in a row mean the space (or the recipe) is wrong, and the search stops with the last message."""
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    sp = space(tmp_path, f"model.name: {{type: categorical, choices: [{tmp_path / 'no-model-a'}, "
                         f"{tmp_path / 'no-model-b'}]}}")
    out = tmp_path / "s"
    with pytest.raises(TunelabError, match="3 trials in a row failed"):
        search.search(path, sp, search.Options(trials=2, out=out, pruner="none", max_steps=2, quiet=True),
                      overrides, log=lambda m: None)
    trials = study_of(out).get_trials()
    assert [t.state.name for t in trials] == ["FAIL"] * 3
    assert all("no-model" in t.user_attrs["error"] for t in trials)


@pytest.mark.parametrize("kind", ["classify", "generate"])
def test_classification_and_generation_are_searched_on_their_dev_score(kind, tmp_path, cls_dir, gen_dir,
                                                                       tiny_model_dir, tiny_causal_dir):
    """A trial's value is the task's 0-1 score of its best dev metrics (generation: exp(-loss))."""
    from conftest import gen_overrides, tiny_overrides

    path = tmp_path / "recipe.yaml"
    path.write_text(f"task: {kind}\n")
    overrides = gen_overrides(gen_dir, tiny_causal_dir, tmp_path / "u", **QUICK) if kind == "generate" else \
        tiny_overrides(tiny_model_dir, tmp_path / "u", **QUICK, **{
            "task": "classify", "data.train": cls_dir / "train.jsonl", "data.dev": cls_dir / "dev.jsonl",
            "data.test": cls_dir / "test.jsonl"})
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}")
    doc = search.search(path, sp, search.Options(trials=1, out=tmp_path / "s", pruner="none", max_steps=4,
                                                 quiet=True), overrides, log=lambda m: None)
    t = doc["trials"][0]
    report = json.loads((Path(t["folder"]) / "report.json").read_text())
    scores = [task_type(kind).score(e["metrics"]) for e in report["evals"]]
    assert t["value"] == pytest.approx(max(scores)) and 0 < t["value"] <= 1
    assert doc["test"]["runs"][0]["score"] is not None


def test_a_trial_of_a_worker_elsewhere_that_stopped_beating_is_run_again(tmp_path, conll_dir, tiny_model_dir):
    """A running trial whose worker is on another machine is judged by its heartbeat: once it is older than
    the grace period, the trial is failed and queued again with the same values."""
    path, overrides = recipe(tmp_path, conll_dir, tiny_model_dir)
    sp = space(tmp_path, "train.lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}")
    out = tmp_path / "s"
    opts = search.Options(trials=1, out=out, pruner="none", max_steps=2, quiet=True, grace_seconds=1)
    out.mkdir()
    study = search.open_study(opts, search.load_space(sp))
    trial = study.ask()
    trial.suggest_float("train.lr", 1.0e-3, 1.0e-2, log=True)
    trial.set_user_attr("host", "elsewhere")
    trial.set_user_attr("pid", 1)
    study._storage.record_heartbeat(trial._trial_id)
    time.sleep(2)
    search.search(path, sp, opts, overrides, log=lambda m: None)
    trials = study_of(out).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0
