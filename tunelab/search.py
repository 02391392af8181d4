"""Hyper-parameter search over any recipe (`tunelab search RECIPE --space SPACE.yaml --trials N`), on Optuna.

A trial is an ordinary run: the recipe with the trial's values as `key=value` overrides, trained by the
recipe's own train() into SEARCH/trials/NNNN (a run folder that `tunelab runs` / `compare` read), its test
split left alone. After each dev evaluation the run reports the task's 0-1 dev score to the trial, and the
pruner may stop it there (the run ends as an early stop does and the trial is recorded as pruned). The
trial's value is its best dev score. When the study has its N finished (complete or pruned) trials, the best
configuration is written as a ready recipe (best.yaml), optionally the top k are trained again over more
seeds and chosen by their mean, the test split is evaluated once on the choice, and the search folder gets
its report (search.md, search.json, plots).

The study lives in an Optuna storage: a SQLite file in the search folder by default (a killed search
continues where it stopped when rerun: the trial it was running is failed and queued again with the same
values, and resumes from its run folder's checkpoint), or any Optuna RDB URL, so that `tunelab search`
workers on several machines share one study. Optuna hands each trial to one worker. A worker that dies is
noticed at once on its own machine (its process is gone) and elsewhere by its missing heartbeat.

The space file maps config keys to distributions:

    train.lr:       {type: loguniform, low: 1.0e-5, high: 1.0e-3}
    train.warmup_ratio: {type: uniform, low: 0.0, high: 0.2}
    train.epochs:   {type: int, low: 1, high: 4}
    tune.method:    {type: categorical, choices: [full, lora]}
    tune.lora_r:    {type: int, low: 4, high: 32, log: true, when: {tune.method: lora}}

`when` makes a key conditional: it is sampled only when the named keys (sampled earlier in the file, or the
recipe's own values) have the given value (or one of a list). `step` gives uniform and int a grid step, `log`
an int a log scale; the grid sampler needs every numeric key's `grid: [values]`.
"""

import json
import math
import os
import socket
import statistics
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab import config as config_mod
from tunelab.errors import TunelabError
from tunelab.io import atomic_write_json, atomic_write_text

TYPES = ("loguniform", "uniform", "int", "categorical")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "asha", "none")
FIELDS = {"type", "low", "high", "step", "log", "choices", "when", "grid"}
FINISHED = ("COMPLETE", "PRUNED")
HEARTBEAT_S, GRACE_S = 30, 120


@dataclass
class Param:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list = field(default_factory=list)
    when: dict = field(default_factory=dict)  # key -> allowed values
    grid: list | None = None


# ---- the space ----

def load_space(path, recipe=None, overrides=()) -> list[Param]:
    """The space file's parameters, in file order, each checked: a known type and its fields, a sane range,
    `when` naming an earlier key or a config key, and (with `recipe`) every key and value accepted by the
    recipe's config (so that a typo stops the search before its first trial)."""
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such search-space file")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise TunelabError(f"{path}{f':{mark.line + 1}' if mark else ''}: invalid YAML "
                           f"({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict) or not raw:
        raise TunelabError(f"{path}: a search space maps config keys to distributions, e.g. "
                           "train.lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}")
    params, keys = [], [str(k) for k in raw]
    for i, (key, spec) in enumerate(raw.items()):
        params.append(_param(path, str(key), spec, set(keys[i + 1:])))
    if recipe is not None:
        _check_against_config(path, params, recipe, overrides)
    return params


def _param(path: Path, key: str, spec, later: set[str]) -> Param:
    where = f"{path}: {key}"
    if not isinstance(spec, dict):
        raise TunelabError(f"{where}: give a mapping such as {{type: uniform, low: 0.0, high: 0.3}}")
    unknown = sorted(set(spec) - FIELDS)
    if unknown:
        raise TunelabError(f"{where}: unknown field(s) {', '.join(unknown)}; a parameter has {', '.join(sorted(FIELDS))}")
    kind = spec.get("type")
    if kind not in TYPES:
        raise TunelabError(f"{where}: type must be one of {', '.join(TYPES)} (got {kind!r})")
    p = Param(key, kind, step=spec.get("step"), log=bool(spec.get("log", False)), grid=spec.get("grid"))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise TunelabError(f"{where}: a categorical parameter needs choices: [a, b, ...]")
        p.choices = choices
    else:
        low, high = spec.get("low"), spec.get("high")
        number = (int,) if kind == "int" else (int, float)
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in (low, high)):
            raise TunelabError(f"{where}: a {kind} parameter needs {'integer' if kind == 'int' else 'numeric'} "
                               "low and high")
        if not low < high:
            raise TunelabError(f"{where}: low ({low}) must be below high ({high})")
        if (kind == "loguniform" or p.log) and low <= 0:
            raise TunelabError(f"{where}: a log scale needs low > 0 (got {low})")
        if p.log and p.step is not None:
            raise TunelabError(f"{where}: log and step do not go together")
        p.low, p.high = low, high
    if p.grid is not None and (not isinstance(p.grid, list) or not p.grid):
        raise TunelabError(f"{where}: grid must be a list of values")
    when = spec.get("when") or {}
    if not isinstance(when, dict):
        raise TunelabError(f"{where}: when maps keys to the value(s) that switch this key on, e.g. "
                           "when: {tune.method: lora}")
    for k, v in when.items():
        if k == key:
            raise TunelabError(f"{where}: when cannot name the key itself")
        p.when[str(k)] = v if isinstance(v, list) else [v]
    after = [k for k in p.when if k in later]
    if after:
        raise TunelabError(f"{where}: when names {after[0]}, which comes later in the file; list it first")
    return p


def _check_against_config(path: Path, params: list[Param], recipe, overrides) -> None:
    """Every key takes each of its extremes/choices in the recipe's config; `when` keys exist."""
    base = config_mod.flatten(config_mod.to_dict(config_mod.load_config(recipe, overrides)))
    for p in params:
        if p.key not in base:
            raise TunelabError(f"{path}: {p.key}: not a config key of this recipe (e.g. train.lr, tune.lora_r)")
        for k in p.when:
            if k not in base:
                raise TunelabError(f"{path}: {p.key}: when names {k}, not a config key")
        samples = p.choices if p.type == "categorical" else [p.low, p.high]
        for value in samples + (p.grid or []):
            try:
                config_mod.load_config(recipe, [*overrides, override(p.key, value)])
            except TunelabError as e:
                raise TunelabError(f"{path}: {p.key}: the value {value!r} is not accepted: {e}") from None


def override(key: str, value) -> str:
    """key=value as `tunelab train` takes it (JSON is YAML: lists, numbers, null; text as written)."""
    return f"{key}={value}" if isinstance(value, str) else f"{key}={json.dumps(value)}"


def suggest(trial, params: list[Param], base: dict) -> dict:
    """The trial's values (key -> value) in file order; a conditional key only when its `when` holds."""
    values = {}
    for p in params:
        if any(values.get(k, base.get(k)) not in allowed for k, allowed in p.when.items()):
            continue
        if p.type == "categorical" and all(c is None or isinstance(c, (bool, int, float, str)) for c in p.choices):
            values[p.key] = trial.suggest_categorical(p.key, p.choices)
        elif p.type == "categorical":  # Optuna's choices are scalars: a list (target modules) goes as its JSON
            values[p.key] = json.loads(trial.suggest_categorical(p.key, [json.dumps(c) for c in p.choices]))
        elif p.type == "int":
            values[p.key] = trial.suggest_int(p.key, p.low, p.high, step=p.step or 1, log=p.log)
        else:
            values[p.key] = trial.suggest_float(p.key, p.low, p.high, step=p.step,
                                                log=p.type == "loguniform" or p.log)
    return values


# ---- the study ----

@dataclass
class Options:
    trials: int
    out: Path
    storage: str | None = None  # an Optuna RDB URL; None: sqlite in the search folder
    study: str = "tunelab"
    sampler: str = "tpe"
    pruner: object = "median"  # a name from PRUNERS or an optuna pruner
    seed: int = 0  # the sampler's
    timeout_minutes: float | None = None  # no new trial after this
    max_steps: int | None = None  # each trial's step budget (train.max_steps)
    threads: int | None = None  # torch threads per trial (train.threads)
    rerun_top: int = 0  # train the k best configurations again over `rerun_seeds`
    rerun_seeds: tuple = ()
    quiet: bool = False
    finish: bool = True  # False: a worker that leaves the end (choice, test, report) to its parent
    grace_seconds: int = GRACE_S  # a running trial without a heartbeat for this long belongs to a dead worker


def storage_url(opts: Options) -> str:
    return opts.storage or f"sqlite:///{(opts.out / 'study.db').resolve()}"


def open_study(opts: Options, params: list[Param]):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(opts)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers wait for the lock
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats: stable
                storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                                     grace_period=opts.grace_seconds,
                                     heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
            break
        except ImportError:
            raise TunelabError(f"--storage {_safe(url)}: the database driver for this URL is not installed "
                               "(PostgreSQL: pip install 'psycopg[binary]'; MySQL: pip install pymysql)") from None
        except Exception as e:  # sqlalchemy's: a malformed URL, a server that does not answer, a refused login
            from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

            # Workers started together on a new database race to create its tables: the loser tries again
            # (PostgreSQL says so with a unique violation, SQLite with "already exists" or a held lock).
            racing = isinstance(e, (IntegrityError, ProgrammingError)) or isinstance(e, OperationalError) and \
                any(w in str(e) for w in ("already exists", "database is locked"))
            if attempt == 4 or not racing:
                raise TunelabError(f"--storage {_safe(url)}: cannot open the study's storage: "
                                   f"{str(e).splitlines()[0]}") from None
            time.sleep(1 + attempt)
    return optuna.create_study(storage=storage, study_name=opts.study, direction="maximize", load_if_exists=True,
                               sampler=_sampler(opts, params, opts.seed), pruner=_pruner(opts.pruner))


def _sampler(opts: Options, params: list[Param], seed: int):
    import optuna

    if opts.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if opts.sampler == "grid":
        grid = {}
        for p in params:
            values = p.choices if p.type == "categorical" and p.grid is None else p.grid
            if values is None:
                raise TunelabError(f"--sampler grid: {p.key} is {p.type}; give it grid: [values]")
            grid[p.key] = values
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _pruner(pruner):
    import optuna

    if not isinstance(pruner, str):
        return pruner
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(),
            "asha": lambda: optuna.pruners.SuccessiveHalvingPruner(),
            "none": lambda: optuna.pruners.NopPruner()}[pruner]()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_dead_trials(study) -> list[int]:
    """Running trials of a worker on this machine whose process is gone (kill -9, a crash): failed now, and
    queued again with the same values (the storage's retry callback), without waiting for the heartbeat's
    grace period. Returns their numbers."""
    import copy

    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host, storage, failed = socket.gethostname(), study._storage, []  # (storage: Optuna has no public getter)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(int(t.user_attrs.get("pid", -1))):
            try:
                if storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                    failed.append(t)
            except UpdateFinishedTrialError:  # another worker got there first
                pass
    retry = storage.get_heartbeat_stale_trial_callback()
    for t in failed:
        retry(study, copy.deepcopy(storage.get_trial(t._trial_id)))
    return [t.number for t in failed]


class _Heartbeat:
    """Records the trial's heartbeat every HEARTBEAT_S seconds while it runs (what optimize() would do), so
    that workers elsewhere can tell a dead worker's trial from a slow one."""

    def __init__(self, study, trial):
        self.storage, self.trial_id, self.stop = study._storage, trial._trial_id, threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self.stop.is_set():
            self.storage.record_heartbeat(self.trial_id)
            self.stop.wait(HEARTBEAT_S)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def counts(study) -> dict:
    from optuna.trial import TrialState

    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


def run_trial(study, trial, recipe, overrides: list, params: list[Param], opts: Options, log) -> float:
    """One trial: its values, its run folder (the failed trial's when this one retries it, resumed from its
    checkpoint), the recipe's train() with the pruner on every dev evaluation. Returns the best dev score;
    raises optuna.TrialPruned when the pruner stopped it."""
    import optuna

    from tunelab.train import checkpoint

    base = config_mod.flatten(config_mod.to_dict(config_mod.load_config(recipe, overrides)))
    values = suggest(trial, params, base)
    folder = trial.user_attrs.get("folder") or str(opts.out / "trials" / f"{trial.number:04d}")
    if "folder" in trial.user_attrs:  # a failed trial's values again (its user attributes came along)
        trial.set_user_attr("retry", True)
    trial.set_user_attr("folder", folder)
    trial.set_user_attr("host", socket.gethostname())
    trial.set_user_attr("pid", os.getpid())
    fixed = [f"output_dir={folder}"] + ([f"train.max_steps={opts.max_steps}"] if opts.max_steps else []) + \
        ([f"train.threads={opts.threads}"] if opts.threads else [])
    cfg = config_mod.load_config(recipe, [*overrides, *(override(k, v) for k, v in values.items()), *fixed])
    resume = checkpoint.find(folder) is not None
    log(f"trial {trial.number}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in values.items())
        + (f" (resuming {folder})" if resume else ""))

    def on_eval(step: int, score: float):
        trial.report(score, step)
        return "pruned by the search" if trial.should_prune() else None

    if not resume and (Path(folder) / "report.json").is_file() and trial.user_attrs.get("retry"):
        # the run had finished when its worker died (before the study heard of it): its report stands
        report = json.loads((Path(folder) / "report.json").read_text())
    else:
        with _Heartbeat(study, trial):
            report = train_recipe(cfg, resume=resume, overwrite=not resume, on_eval=on_eval, test=False)
    scores = trial_values(report)
    if not scores:
        raise TunelabError(f"trial {trial.number}: the run made no dev evaluation; a search selects on dev")
    trial.set_user_attr("steps", report["steps"])
    trial.set_user_attr("train_seconds", report["train_seconds"])
    if report.get("stopped_by") == "pruned by the search":
        raise optuna.TrialPruned()
    return max(scores)


def trial_values(report: dict) -> list[float]:
    """The 0-1 dev scores a run reported (what the trial's value is the best of)."""
    from tunelab.tasks import task_type

    if report["task"] == "multitask":
        return [e["dev"] for e in report["evals"]]
    kind = task_type(report["task"])
    return [kind.score(e["metrics"]) for e in report["evals"]]


def train_recipe(cfg, **kw) -> dict:
    """The recipe's train() for cfg.task."""
    if cfg.task == "multitask":
        from tunelab.multitask import train as train_multitask

        return train_multitask(cfg, **kw)
    from tunelab.train import train

    return train(cfg, **kw)


def check_recipe(recipe, overrides) -> None:
    cfg = config_mod.load_config(recipe, overrides)
    if cfg.task == "rl":
        raise TunelabError("tunelab search: task: rl has no dev score to select on per evaluation yet; search "
                           "its supervised warm start (task: generate) instead")
    has_dev = any(t.data.dev for t in cfg.tasks.values()) if cfg.task == "multitask" else \
        bool(cfg.data.dev or cfg.data.dataset)
    if not has_dev:
        raise TunelabError("tunelab search selects on dev: the recipe needs a dev split (data.dev, or a built-in "
                           "data.dataset with one)")


def search(recipe, space, opts: Options, overrides=(), log=print) -> dict:
    """Run this worker's share of the study until it has opts.trials finished trials (or the timeout), then,
    if the study is done and no trial is running, choose, test once and report. Returns search.json's dict
    (or the study's state while other workers still run)."""
    try:
        import optuna
    except ImportError:
        raise TunelabError("tunelab search needs Optuna: pip install -e '.[search]'") from None

    from tunelab import progress

    overrides = list(overrides)
    check_recipe(recipe, overrides)
    params = load_space(space, recipe, overrides)
    opts.out.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(opts, params)
    study.set_user_attr("recipe", str(Path(recipe).resolve()))
    revived = fail_dead_trials(study)
    if revived:
        log(f"trial(s) {', '.join(map(str, revived))} of a stopped worker are queued again and resume")
    deadline = time.monotonic() + opts.timeout_minutes * 60 if opts.timeout_minutes else None
    done = lambda: sum(counts(study)[s] for s in FINISHED)  # noqa: E731
    bar = progress.bar(total=opts.trials, initial=min(done(), opts.trials), desc="search", unit="trial",
                       disable=opts.quiet)
    failures = 0

    while True:
        # A worker elsewhere that stopped beating: its trial is failed and queued again (optimize() would do
        # this before each trial; this loop is ask/tell).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if done() + counts(study)["RUNNING"] >= opts.trials or (deadline is not None and time.monotonic() > deadline):
            break
        with warnings.catch_warnings():
            # Optuna would run the heartbeat inside optimize(); this loop runs its own (_Heartbeat)
            warnings.filterwarnings("ignore", message="Heartbeat of storage")
            trial = study.ask()
        # Sampling happens at suggest time, after ask: a sampler seeded by the trial's number draws alike on
        # a rerun, and workers started together do not draw the same values (one seed would make them).
        study.sampler = _sampler(opts, params, opts.seed + trial.number)
        try:
            value = run_trial(study, trial, recipe, overrides, params, opts, log)
            study.tell(trial, value)
            failures = 0
        except optuna.TrialPruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            failures = 0
        except KeyboardInterrupt:
            raise  # the trial stays running; the next `tunelab search` revives it (as after kill -9)
        except TunelabError as e:  # e.g. values the config or the model refuse together: the search goes on
            trial.set_user_attr("error", str(e))
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            failures += 1
            log(f"trial {trial.number} failed: {e}")
            if failures == 3:
                raise TunelabError(f"3 trials in a row failed; the last: {e}") from None
        except BaseException:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        bar.n = min(done(), opts.trials)
        best = _best(study)
        bar.set_postfix(best=f"{best.value:.4f} (trial {best.number})" if best else "-", refresh=True)
    bar.close()
    c = counts(study)
    if done() < opts.trials or c["RUNNING"]:
        why = "the time limit was reached" if done() < opts.trials and not c["RUNNING"] else \
            f"{c['RUNNING']} trial(s) still run in other workers"
        log(f"{done()} of {opts.trials} trials finished; {why}: the report comes when the study is complete "
            "(rerun tunelab search to continue)")
        return {"finished": done(), "requested": opts.trials, "complete": False}
    if not opts.finish:
        return {"finished": done(), "requested": opts.trials, "complete": True}
    return finish(study, recipe, overrides, params, opts, log)


def _best(study):
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(complete, key=lambda t: t.value) if complete else None


# ---- the end: choice, test once, report ----

def finish(study, recipe, overrides, params, opts: Options, log) -> dict:
    """best.yaml, the optional reruns of the top k over more seeds, the test split once on the choice, and
    the report (search.json, search.md, history.png, parallel.png)."""
    from optuna.trial import TrialState

    written = opts.out / "search.json"
    if written.is_file():
        doc = json.loads(written.read_text())
        if [r["number"] for r in doc["trials"]] == [t.number for t in study.get_trials(deepcopy=False)]:
            log(f"the search is complete; its report stands: {opts.out / 'search.md'}")
            return doc
    complete = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: -t.value)
    if not complete:
        raise TunelabError("no trial completed (all pruned or failed): widen the space or use --pruner none")
    best = complete[0]
    if not (Path(best.user_attrs["folder"]) / "config.yaml").is_file():  # a worker elsewhere ran it
        log(f"the best trial ({best.number}) ran on {best.user_attrs.get('host')} in {best.user_attrs['folder']}, "
            "which this machine cannot see: rerun the same tunelab search command there to finish (best.yaml, "
            "test once, report)")
        return {"finished": len(complete), "requested": opts.trials, "complete": True,
                "finish_on": best.user_attrs.get("host")}
    best_cfg = config_mod.load_config(Path(best.user_attrs["folder"]) / "config.yaml")
    chosen, reruns = best, []
    if opts.rerun_top and opts.rerun_seeds:
        reruns, chosen = rerun_top(complete[:opts.rerun_top], opts, log)
        best_cfg = config_mod.load_config(Path(chosen.user_attrs["folder"]) / "config.yaml")
    recipe_doc = config_mod.to_dict(best_cfg)
    recipe_doc["output_dir"] = str(opts.out / "best")
    atomic_write_text(opts.out / "best.yaml", "# the chosen configuration of tunelab search: tunelab train best.yaml\n"
                      + yaml.safe_dump(recipe_doc, sort_keys=False, allow_unicode=True))
    folders = [chosen.user_attrs["folder"]] + [r["folder"] for r in reruns
                                                if r["trial"] == chosen.number and r["seed"] != best_cfg.train.seed]
    test = test_once(best_cfg, folders, log)
    doc = {"recipe": str(recipe), "overrides": overrides, "storage": _safe(storage_url(opts)),
           "study": opts.study, "sampler": opts.sampler, "pruner": opts.pruner if isinstance(opts.pruner, str)
           else type(opts.pruner).__name__, "requested": opts.trials, "complete": True,
           "space": [p.__dict__ for p in params],
           "trials": [_row(t) for t in study.get_trials(deepcopy=False)],
           "best": {"trial": best.number, "value": best.value, "params": best.params},
           "chosen": {"trial": chosen.number, "params": chosen.params, "folder": chosen.user_attrs["folder"]},
           "reruns": reruns, "test": test, "importance": importance(study)}
    atomic_write_json(opts.out / "search.json", doc)
    plots(study, opts.out)
    atomic_write_text(opts.out / "search.md", markdown(doc))
    log(f"best trial {best.number}: dev {best.value:.4f}; test (once, on the chosen configuration): "
        f"{test['mean']:.4f}; report {opts.out / 'search.md'}, recipe {opts.out / 'best.yaml'}")
    return doc


def _safe(url: str) -> str:
    """A storage URL without its password."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: show it without anything after '@'
        return url.split("@")[-1]


def _row(t) -> dict:
    return {"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
            "steps": t.user_attrs.get("steps"), "train_seconds": t.user_attrs.get("train_seconds"),
            "folder": t.user_attrs.get("folder"), "retry_of": t.system_attrs.get("failed_trial"),
            "last_step": max(t.intermediate_values) if t.intermediate_values else None}


def rerun_top(top: list, opts: Options, log) -> tuple[list[dict], object]:
    """Each of the top configurations trained again with every seed in rerun_seeds (its own trial's seed
    counts as one); the choice is the best mean dev score. Runs already finished are read, not retrained."""
    rows, means = [], {}
    for t in top:
        cfg = config_mod.load_config(Path(t.user_attrs["folder"]) / "config.yaml")
        scores = {cfg.train.seed: t.value}
        rows.append({"trial": t.number, "seed": cfg.train.seed, "dev": t.value, "folder": t.user_attrs["folder"]})
        for seed in opts.rerun_seeds:
            if seed in scores:
                continue
            folder = opts.out / "reruns" / f"{t.number:04d}-seed{seed}"
            if (folder / "report.json").is_file():
                report = json.loads((folder / "report.json").read_text())
            else:
                log(f"trial {t.number} again with seed {seed}")
                from tunelab.train import checkpoint

                resume = checkpoint.find(folder) is not None
                again = config_mod.load_config(Path(t.user_attrs["folder"]) / "config.yaml",
                                               [f"train.seed={seed}", f"output_dir={folder}"])
                report = train_recipe(again, resume=resume, overwrite=not resume, test=False)
            scores[seed] = max(trial_values(report))
            rows.append({"trial": t.number, "seed": seed, "dev": scores[seed], "folder": str(folder)})
        means[t.number] = statistics.mean(scores.values())
    chosen = max(top, key=lambda t: means[t.number])
    return rows, chosen


def test_once(cfg, folders: list, log) -> dict:
    """The test split of cfg's data, evaluated on each folder's model (the chosen configuration's seeds):
    the per-folder 0-1 scores and their mean (and sd with several)."""
    from tunelab.data import load_splits
    from tunelab.predict import Predictor
    from tunelab.tasks import task_type

    per = []
    for folder in folders:
        pred = Predictor(folder, cfg.train.device, 64, cfg.train.bf16)
        if cfg.task == "multitask":
            scores = {}
            for name, spec in cfg.tasks.items():
                test = load_splits(spec.data, spec.task).test
                if test:
                    scores[name] = task_type(spec.task).score(pred.evaluate(test, desc=f"test {name}", task=name))
            per.append({"folder": str(folder), "score": statistics.mean(scores.values()) if scores else None,
                        "tasks": scores})
        else:
            test = load_splits(cfg.data, cfg.task).test
            metrics = pred.evaluate(test, desc="test") if test else None
            per.append({"folder": str(folder), "score": task_type(cfg.task).score(metrics) if metrics else None,
                        "metrics": metrics})
    scores = [p["score"] for p in per if p["score"] is not None]
    if not scores:
        log("the recipe has no test split: nothing evaluated at the end")
    return {"runs": per, "mean": statistics.mean(scores) if scores else math.nan,
            "sd": statistics.stdev(scores) if len(scores) > 1 else None}


def importance(study) -> dict:
    """Optuna's parameter importances (fANOVA) over the complete trials; empty when there are too few."""
    import optuna

    try:
        return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # fewer than two complete trials, or one value for every parameter
        return {}


def plots(study, out: Path) -> None:
    """history.png (dev score per trial and best so far) and parallel.png (values against the score)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    from tunelab.report import save_figure

    for name, draw in (("history.png", ovm.plot_optimization_history), ("parallel.png", ovm.plot_parallel_coordinate)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna marks its matplotlib plots experimental
            try:
                ax = draw(study, target_name="dev score (0-1)")
            except (ValueError, RuntimeError):  # e.g. no parameter varies: nothing to draw
                continue
        fig = ax.figure if hasattr(ax, "figure") else plt.gcf()
        fig.set_size_inches(8, 4.5)
        fig.tight_layout()
        save_figure(fig, out / name)


def markdown(doc: dict) -> str:
    def num(v, digits=4):
        return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    def params(p):
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())

    by = {s: sum(1 for t in doc["trials"] if t["state"] == s) for s in ("COMPLETE", "PRUNED", "FAIL")}
    lines = [f"# tunelab search: {doc['recipe']}", "",
             f"{by['COMPLETE']} complete, {by['PRUNED']} pruned, {by['FAIL']} failed trial(s) of {doc['requested']} "
             f"requested; sampler {doc['sampler']}, pruner {doc['pruner']}; study {doc['study']} in "
             f"{doc['storage']}. Selection on the dev split; the test split is evaluated once, at the end.", "",
             f"**Best trial {doc['best']['trial']}**: dev {doc['best']['value']:.4f} with "
             f"{params(doc['best']['params'])}. Ready recipe: `best.yaml`.", ""]
    if doc["reruns"]:
        lines += [f"Top configurations again over seeds (the choice is the best mean): chosen trial "
                  f"{doc['chosen']['trial']}.", "", "| trial | seed | dev |", "|---:|---:|---:|"]
        lines += [f"| {r['trial']} | {r['seed']} | {r['dev']:.4f} |" for r in doc["reruns"]]
        lines.append("")
    t = doc["test"]
    if not math.isnan(t["mean"]):
        lines += [f"**Test** (chosen configuration, {len(t['runs'])} model(s)): {t['mean']:.4f}"
                  + (f" ± {t['sd']:.4f}" if t["sd"] is not None else ""), ""]
    if doc["importance"]:
        lines += ["Parameter importance (fANOVA over the complete trials):", "", "| parameter | importance |",
                  "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in doc["importance"].items()] + [""]
    lines += ["| trial | state | dev | last step | seconds | values | folder |", "|---:|---|---:|---:|---:|---|---|"]
    for r in doc["trials"]:
        lines.append(f"| {r['number']} | {r['state'].lower()}{' (retry of ' + str(r['retry_of']) + ')' if r['retry_of'] is not None else ''} "
                     f"| {num(r['value'])} | {num(r['last_step'])} | {num(r['train_seconds'], 1)} | {params(r['params'])} "
                     f"| {r['folder'] or '-'} |")
    lines += ["", "![optimisation history](history.png)", "", "![parallel coordinates](parallel.png)", ""]
    return "\n".join(lines)
