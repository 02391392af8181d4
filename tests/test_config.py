"""tunelab.config: choices and ranges declared beside the fields, checked in every section; errors that name the
recipe's file and line (or the override); one list per set of choices, shared with the code that uses it."""

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from tunelab import config
from tunelab.config import SOLO_TASKS, load_config, to_yaml
from tunelab.errors import TunelabError

REPO = Path(__file__).resolve().parents[1]
NER = ["data.train=x.conll"]
MULTITASK = ["task=multitask", "tasks.a.task=ner", "tasks.a.data.train=a.conll", "tasks.b.task=classify",
             "tasks.b.data.train=b.jsonl"]


def error(*args, **kwargs) -> str:
    with pytest.raises(TunelabError) as e:
        load_config(*args, **kwargs)
    return str(e.value)


def recipe(tmp_path, text: str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(text, encoding="utf-8")
    return p


# --- the line of the offending key in a recipe --------------------------------------------------------------

RECIPE = """\
task: ner
data:
  train: x.conll
train:
  epochs: 2
  lr: {lr}
  scheduler: {scheduler}
tune:
  method: {method}
{extra}"""


def bad_recipe(tmp_path, lr="1e-4", scheduler="linear", method="full", extra=""):
    return recipe(tmp_path, RECIPE.format(lr=lr, scheduler=scheduler, method=method, extra=extra))


def test_recipe_is_valid(tmp_path):
    cfg = load_config(bad_recipe(tmp_path))
    assert (cfg.train.lr, cfg.train.epochs, cfg.tune.method) == (1e-4, 2.0, "full")


@pytest.mark.parametrize("kwargs, line, words", [
    ({"lr": "0"}, 6, ["config key 'train.lr'", "0.0 is out of range", "> 0"]),
    ({"lr": "abc"}, 6, ["config key 'train.lr'", "expected float", "'abc'"]),
    ({"scheduler": "cosine_restarts"}, 7, ["config key 'train.scheduler'", "is not one of linear, cosine, constant"]),
    ({"method": "adapter"}, 9, ["config key 'tune.method'", "'adapter' is not one of full, lora"]),
    ({"extra": "  lora_rank: 4\n"}, 10, ["unknown config key 'tune.lora_rank'", "lora_r"]),
    ({"extra": "modle:\n  name: x\n"}, 10, ["unknown config key 'modle'"]),
    ({"extra": "model: bert\n"}, 10, ["model must be a mapping"]),
    ({"extra": "rl:\n  rewards:\n    bleu: high\n"}, 12, ["config key 'rl.rewards.bleu'", "expected float"]),
    ({"extra": "rl:\n  top_p: 1.5\n"}, 11, ["config key 'rl.top_p'", "out of range", "<= 1"]),
    ({"method": "prompt", "extra": "  merge: true\n"}, 10, ["config key 'tune.merge'", "only lora and ia3"]),
])
def test_recipe_errors_name_the_line(tmp_path, kwargs, line, words):
    p = bad_recipe(tmp_path, **kwargs)
    msg = error(p)
    assert msg.startswith(f"{p}:{line}: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_lines_inside_tasks(tmp_path):
    text = """\
task: multitask
tasks:
  ner:
    task: ner
    data:
      train: a.conll
      tag_scheme: {scheme}
    max_length: {max_length}
  topic:
    task: {task}
    data: {{train: b.jsonl}}
    {extra}
"""
    ok = dict(scheme="bioes", max_length=64, task="classify", extra="")
    assert load_config(recipe(tmp_path, text.format(**ok))).tasks["ner"].data.tag_scheme == "bioes"
    for change, line, words in [
        ({"max_length": 4}, 8, ["config key 'tasks.ner.max_length'", "4 is out of range (must be >= 8)"]),
        ({"scheme": "bioul"}, 7, ["config key 'tasks.ner.data.tag_scheme'", "'bioul' is not one of iob2"]),
        ({"task": "parse"}, 10, ["config key 'tasks.topic.task'", "'parse' is not one of ner, classify, generate"]),
        ({"extra": "wieght: 2"}, 12, ["unknown config key 'tasks.topic.wieght'", "weight"]),
        ({"extra": "weight: x"}, 12, ["config key 'tasks.topic.weight'", "expected float"]),
        ({"extra": "weight: 0"}, 12, ["config key 'tasks.topic.weight'", "out of range (must be > 0)"]),
    ]:
        p = recipe(tmp_path, text.format(**{**ok, **change}))
        msg = error(p)
        assert msg.startswith(f"{p}:{line}: "), msg
        for w in words:
            assert w in msg, (w, msg)


def test_cross_field_rule_names_the_line_of_its_key(tmp_path):
    p = recipe(tmp_path, "task: multitask\ntasks:\n  a: {task: ner, data: {train: a.conll}}\n"
                         "  b: {task: classify, data: {train: b.jsonl}}\nmultitask:\n  weighting: pcgrad\n")
    msg = error(p)
    assert msg.startswith(f"{p}:6: ") and "needs multitask.mix=all" in msg
    p = recipe(tmp_path, "task: multitask\n\ntasks:\n  a: {task: ner, data: {train: a.conll}}\n")
    assert error(p).startswith(f"{p}:3: task: multitask needs at least two")


def test_top_level_and_syntax_errors_keep_their_line(tmp_path):
    p = recipe(tmp_path, "# a list, not a mapping\n- train\n")
    assert error(p).startswith(f"{p}:2: top level must be a mapping")
    p = recipe(tmp_path, "task: ner\ndata:\n  train: [a.conll\n  dev: b\n")
    assert error(p).startswith(f"{p}:4: invalid YAML")


def test_merge_keys_and_flow_mappings_report_lines(tmp_path):
    p = recipe(tmp_path, "data: {train: x.conll}\ntrain: {epochs: 1,\n  lr: -1}\n")
    assert error(p).startswith(f"{p}:3: config key 'train.lr'")
    p = recipe(tmp_path, "data: {train: x.conll}\ntrain:\n  <<: {warmup_ratio: 1}\n  epochs: 1\n")
    assert error(p).startswith(f"{p}:3: config key 'train.warmup_ratio'")


def test_overrides_name_the_override_and_win_over_the_recipe(tmp_path):
    p = bad_recipe(tmp_path, lr="0")
    assert load_config(p, ["train.lr=3e-5"]).train.lr == 3e-5  # the override replaced the bad value
    msg = error(bad_recipe(tmp_path), ["train.lr=0"])
    assert msg.startswith("override 'train.lr=0': config key 'train.lr': 0.0 is out of range"), msg
    assert error(None, NER + ["train.lrr=1"]).startswith("override 'train.lrr=1': unknown config key 'train.lrr'")
    assert error(None, NER + ["rl.clip=abc"]).startswith("override 'rl.clip=abc': config key 'rl.clip': expected")
    assert error(None, NER + ["tune.merge=true"]).startswith("override 'tune.merge=true': config key 'tune.merge'")


def test_rules_name_where_their_key_came_from():
    rl = ["task=rl", "data.train=x.jsonl", "rl.rewards.rouge_l=1"]
    assert error(None, rl + ["tune.method=bitfit"]).startswith("override 'tune.method=bitfit': config key 'tune.method'")
    assert error(None, rl + ["rl.samples_per_prompt=1"]).startswith("override 'rl.samples_per_prompt=1'")
    # a key left at its default has no file or override to point at: the message starts with the rule
    assert error(None, ["task=multitask"]).startswith("task: multitask needs at least two")


# --- every declared choice and range is enforced, in every section ------------------------------------------

def declared(cls, prefix=""):
    """(key, field) for every field with choices or a range, sections and a `tasks:` entry included."""
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            yield from declared(f.default_factory, f"{prefix}{f.name}.")
        elif f.name == "tasks":
            yield from declared(config.TaskSpec, f"{prefix}tasks.a.")
        elif f.metadata:
            yield prefix + f.name, f


DECLARED = list(declared(config.RunConfig))


def outside(f) -> list:
    """Values just outside each declared bound, or a value not among the choices."""
    if "choices" in f.metadata:
        return ["nope"]
    step = 1 if int in (f.type, *typing.get_args(f.type)) else 0.5
    bounds = f.metadata["range"]
    return ([bounds["gt"]] if "gt" in bounds else []) + ([bounds["ge"] - step] if "ge" in bounds else []) + \
        ([bounds["lt"]] if "lt" in bounds else []) + ([bounds["le"] + step] if "le" in bounds else [])


def inside(f) -> list:
    """The choices, and the inclusive bounds themselves."""
    if "choices" in f.metadata:
        return list(f.metadata["choices"])
    bounds = f.metadata["range"]
    return [bounds[op] for op in ("ge", "le") if op in bounds]


def test_every_section_declares_checks():
    sections = {key.split(".")[0] for key, _ in DECLARED if "." in key}
    assert sections >= {"model", "data", "train", "tune", "tasks", "multitask", "rl"}
    assert {"tasks.a.data.tag_scheme", "tasks.a.max_length", "rl.top_p", "train.lr", "task"} <= dict(DECLARED).keys()
    assert all(f.metadata.get("choices") or f.metadata.get("range") for _, f in DECLARED)


@pytest.mark.parametrize("key, f", DECLARED, ids=[k for k, _ in DECLARED])
def test_declared_checks_are_enforced(key, f):
    base = MULTITASK if key.startswith("tasks.") else NER
    if key == "tasks.a.task":  # ner -> classify keeps the tasks valid
        base = [o for o in base if not o.startswith("tasks.a.task")]
    for value in outside(f):
        msg = error(None, base + [f"{key}={value}"])
        assert msg.startswith(f"override '{key}={value}': config key {key!r}: "), msg
        assert ("is not one of" if "choices" in f.metadata else "is out of range") in msg, msg
    for value in inside(f):
        if key == "task" and value in ("multitask", "rl", "continual"):
            continue  # these need sections of their own (checked elsewhere)
        if key.endswith(".task") and value in SOLO_TASKS:
            continue  # a whole-LM task type is refused as an entry (test_prompting checks the message)
        load_config(None, base + [f"{key}={value}"])


def test_none_is_unset_not_out_of_range():
    cfg = load_config(None, NER + ["rl.kl_target=null", "train.patience=null", "data.format=null"])
    assert (cfg.rl.kl_target, cfg.train.patience, cfg.data.format) == (None, None, None)


def test_recipes_load_and_saved_configs_load_back(tmp_path):
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for p in recipes:
        cfg = load_config(p)
        saved = recipe(tmp_path, to_yaml(cfg))  # what a run writes as config.yaml
        assert load_config(saved) == cfg, p


# --- one list per set of choices --------------------------------------------------------------------------

def choices(cls, name):
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["choices"]


def cli_choices(command, option):
    from tunelab.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices[command]
    return next(a for a in sub._actions if option in a.option_strings).choices


def test_tag_schemes_are_one_list():
    from tunelab.data import tags

    assert choices(config.DataConfig, "tag_scheme") is tags.SCHEMES
    assert cli_choices("eval", "--tag-scheme") is tags.SCHEMES and cli_choices("predict", "--tag-scheme") is tags.SCHEMES


def test_input_formats_are_one_list():
    from tunelab.data import stream

    assert cli_choices("predict", "--format") is stream.FORMATS and cli_choices("eval", "--format") is stream.FORMATS
    # data.format takes the training formats: the same list without "text" (unlabelled lines)
    assert choices(config.DataConfig, "format") is config.DATA_FORMATS
    assert config.DATA_FORMATS == tuple(f for f in stream.FORMATS if f != "text")


def test_tune_methods_are_one_list():
    import tunelab.peft

    assert tunelab.peft.ADAPTERS is config.ADAPTERS
    assert choices(config.TuneConfig, "method") is config.METHODS
    assert set(config.ADAPTERS) < set(config.METHODS)
    assert set(config.MULTITASK_METHODS) <= set(config.METHODS) and set(config.RL_METHODS) <= set(config.METHODS)


def test_rl_estimators_are_one_list():
    from tunelab.rl import estimators

    assert choices(config.RLConfig, "estimator") is estimators.ESTIMATORS is config.ESTIMATORS


def test_multitask_samplings_are_one_list():
    from tunelab.multitask import sampling

    assert choices(config.MultiTaskConfig, "sampling") is sampling.SAMPLINGS is config.SAMPLINGS
    for kind in sampling.SAMPLINGS:  # the sampler knows every name the config accepts
        probs = sampling.task_probabilities({"a": 10, "b": 90}, kind)
        assert sum(probs.values()) == pytest.approx(1.0)


def test_task_lists():
    assert choices(config.RunConfig, "task") == config.TASKS + ("multitask", "rl", "continual")
    assert choices(config.TaskSpec, "task") is config.TASKS


def test_config_imports_without_torch():
    code = "import sys, tunelab.config; assert 'torch' not in sys.modules, 'torch'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
