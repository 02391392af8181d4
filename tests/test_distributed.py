"""Distributed training on CPU (gloo): 2 processes started by `accelerate launch` / `torchrun` against one.

Stated tolerances (tunelab.distributed explains why the runs are the same optimisation): per-step training
loss within 1e-5 relative and final weights within 1e-4 absolute of the one-process run at the same global
batch (the differences are float summation order: the gradient is summed in two halves and all-reduced).
Evaluation is exact: every rank runs the one-process inference batches and the outputs are gathered.
Dropout is off in these runs (model.dropout=0): dropout masks depend on how a batch is cut.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import conll_text, make_documents, ner_overrides
from tunelab import distributed
from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.train import train

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
           OMP_NUM_THREADS="1")
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-4
# 47 training sentences in global batches of 10: the last batch of each epoch (7 rows) splits 4 / 3.
SETTINGS = {"model.dropout": 0.0, "train.threads": 1, "train.epochs": 5, "train.batch_size": 10,
            "data.max_train_examples": 47, "train.lr": 3e-3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args) -> list[str]:
    # --multi_gpu is accelerate's torchrun launcher; with no GPU, tunelab joins a gloo (MULTI_CPU) group.
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), *args]


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(free_port()), *args]


def run(cmd, log: Path, **kw) -> subprocess.CompletedProcess:
    with open(log, "wb") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, stdout=f, stderr=subprocess.STDOUT, timeout=300, **kw)
    assert proc.returncode == 0, log.read_text()[-4000:]
    return proc


def weights(folder) -> dict:
    return load_file(str(Path(folder) / "model.safetensors"))


def history_losses(folder) -> list[float]:
    return [h["loss"] for h in json.loads((Path(folder) / "report.json").read_text())["history"]]


@pytest.fixture(scope="module")
def odd_dev(tmp_path_factory):
    """A dev set of 151 sentences (odd; several inference batches, the last one short)."""
    path = tmp_path_factory.mktemp("odd-dev") / "dev.conll"
    path.write_text(conll_text(make_documents(7, 1, 151)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory, conll_dir, tiny_model_dir, odd_dev):
    """The same recipe on one process (in this process) and on two (accelerate launch)."""
    d = tmp_path_factory.mktemp("dist")
    overrides = lambda out: ner_overrides(conll_dir, tiny_model_dir, out, **SETTINGS,  # noqa: E731
                                          **{"data.dev": odd_dev})
    one = train(load_config(None, overrides(d / "one")))
    recipe = d / "recipe.yaml"
    recipe.write_text("task: ner\n")
    log = d / "two.log"
    proc = run(accelerate_launch("-m", "tunelab", "train", str(recipe), *overrides(d / "two")), log)
    return d, one, recipe, overrides, log.read_text(), proc


def test_two_processes_follow_the_one_process_run(pair):
    d, one, _, _, log, _ = pair
    two = json.loads((d / "two" / "report.json").read_text())
    assert two["processes"] == 2 and one["processes"] == 1 and two["global_batch"] == 10
    assert "effective global batch 10 = 5 per device x 1 accumulation x 2 process(es)" in log
    assert log.count("model, report and curves") == 1  # one process prints, logs and writes
    assert two["steps"] == one["steps"] == 25
    a, b = [h["loss"] for h in one["history"]], [h["loss"] for h in two["history"]]
    assert a[-1] < 0.5 * a[0]  # it learns: the comparison is not between two flat lines
    for x, y in zip(a, b):
        assert y == pytest.approx(x, rel=LOSS_RTOL)
    wa, wb = weights(d / "one"), weights(d / "two")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_ATOL
    # the whole global batch is counted once: same tokens and samples as one process
    assert two["train_tokens"] == one["train_tokens"]
    assert sum(h["samples"] for h in two["history"]) == sum(h["samples"] for h in one["history"]) == 5 * 47
    assert all(h["tokens_per_second"] > 0 and h["peak_memory_mb"] > 0 for h in two["history"])


def test_two_process_tensorboard_holds_the_logged_scalars(pair):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = pair[0]
    report = json.loads((d / "two" / "report.json").read_text())
    files = list((d / "two" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1  # the main process only
    ea = EventAccumulator(str(d / "two" / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/samples_per_second",
            "train/peak_memory_mb", "dev/main", "dev/micro/f1", "test/main"} <= tags
    loss = ea.Scalars("train/loss")
    assert [e.step for e in loss] == [h["step"] for h in report["history"]]
    assert [e.value for e in loss] == pytest.approx([h["loss"] for h in report["history"]], rel=1e-6)
    assert [(e.step, e.value) for e in ea.Scalars("dev/main")] == \
        [(ev["step"], pytest.approx(ev["dev"], rel=1e-6)) for ev in report["evals"]]


EVAL_SCRIPT = """
import json, sys
from tunelab import distributed
from tunelab.data import read_file
from tunelab.predict import Predictor, evaluate
dist = distributed.start("cpu")
pred = Predictor(sys.argv[1], device="cpu", batch_size=16)
task, model = pred.use()
examples = read_file(sys.argv[2], task.kind, None, True)
metrics = evaluate(task, model, examples, dist.device, batch_size=16, dist=dist)
json.dump(metrics, open(f"{sys.argv[3]}.rank{dist.rank}.json", "w"))
"""


@pytest.mark.parametrize("kind", ["ner", "classify"])
def test_evaluation_under_two_processes_equals_one_process(kind, pair, odd_dev, cls_model, cls_dir, tmp_path):
    from tunelab.data import read_file
    from tunelab.predict import Predictor

    torch.set_num_threads(1)
    folder, data = (pair[0] / "one", odd_dev) if kind == "ner" else (cls_model, cls_dir / "dev.jsonl")
    examples = read_file(str(data), kind, None, True)
    if kind == "classify":  # an odd count, and more rows than one batch of 16
        examples = examples[:11] * 3
        data = tmp_path / "dev.jsonl"
        data.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples))
    assert len(examples) % 2 == 1
    single = Predictor(folder, device="cpu", batch_size=16).evaluate(examples)
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT)
    run(torchrun(str(script), str(folder), str(data), str(tmp_path / "m")), tmp_path / "eval.log")
    for r in (0, 1):  # every rank has the metrics of all examples, exactly one process's
        assert json.loads((tmp_path / f"m.rank{r}.json").read_text()) == json.loads(json.dumps(single))
    support = single["micro"]["support"] if kind == "ner" else sum(v["support"] for v in single["per_class"].values())
    assert support == (sum(t.startswith("B-") for e in examples for t in e.tags) if kind == "ner" else len(examples))


def test_resume_after_killing_a_two_process_run(pair, tmp_path):
    d, _, recipe, overrides, _, _ = pair
    out = tmp_path / "resumed"
    args = ["-m", "tunelab", "train", str(recipe), *overrides(out), "train.save_every=1"]
    with open(tmp_path / "killed.log", "wb") as log:
        proc = subprocess.Popen(accelerate_launch(*args), cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not _checkpoint_step(out) >= 8:
                assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint appeared"
                time.sleep(0.05)
        finally:
            kill_tree(proc.pid)  # the workers first: torchrun starts each in its own session
            proc.wait()
    assert not (out / "report.json").exists()
    killed_at = _checkpoint_step(out)
    assert 8 <= killed_at < 25

    run(accelerate_launch(*args, "--resume"), tmp_path / "resume.log")
    assert f"at step {killed_at}/25" in (tmp_path / "resume.log").read_text()
    # the same as the uninterrupted two-process run
    assert history_losses(out) == history_losses(d / "two")
    wa, wb = weights(d / "two"), weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not (out / "checkpoint").exists()
    # TensorBoard: the steps logged again after the checkpoint replace the killed process's
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"))
    ea.Reload()
    assert [e.step for e in ea.Scalars("train/loss")] == list(range(1, 26))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (Linux /proc), the deepest first."""
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    for child in children:
        kill_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _checkpoint_step(out: Path) -> int:
    try:
        return json.loads((out / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def test_torchrun_runs_the_recipe_too(pair, tmp_path):
    d, _, recipe, overrides, _, _ = pair
    run(torchrun("-m", "tunelab", "train", str(recipe), *overrides(tmp_path / "tr")), tmp_path / "tr.log")
    assert history_losses(tmp_path / "tr") == history_losses(d / "two")


# --- the pieces, without processes -------------------------------------------------------------------------


def test_shards_cover_every_row_once():
    for world, n in [(2, 7), (3, 7), (2, 1), (4, 10)]:
        parts = distributed.Dist(world=world).shards(list(range(n)))
        assert len(parts) == world and sum(parts, []) == list(range(n))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
        for r in range(world):
            assert distributed.Dist(world=world, rank=r).shard(list(range(n))) == parts[r]
    assert distributed.Dist(world=2).shards([5]) == [[5], []]


def test_loss_weights_make_the_rank_average_the_global_mean():
    """What DDP computes (the mean over ranks of each rank's gradient) with tunelab's loss weights equals the
    gradient of the token mean over the whole global batch; plain per-rank means do not."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    feats = [{"x": torch.randn(n, 4), "labels": [int(t) for t in torch.randint(-1, 3, (n,))]}
             for n in (2, 5, 3, 9, 1)]
    for f in feats:
        f["labels"] = [t if t >= 0 else -100 for t in f["labels"]]
    rows = list(range(len(feats)))

    def grad(idx, scale=1.0):
        layer.zero_grad()
        x = torch.cat([feats[i]["x"] for i in idx])
        y = torch.tensor([t for i in idx for t in feats[i]["labels"]])
        (torch.nn.functional.cross_entropy(layer(x), y, ignore_index=-100) * scale).backward()
        return layer.weight.grad.clone()

    want = grad(rows)
    for world in (2, 3):
        ranks = [distributed.Dist(world=world, rank=r) for r in range(world)]
        weighted = sum(grad(d.shard(rows), distributed.loss_weight(feats, rows, d.shard(rows), d)) for d in ranks)
        assert torch.allclose(weighted / world, want, atol=1e-6)
        plain = sum(grad(d.shard(rows)) for d in ranks) / world
        assert not torch.allclose(plain, want, atol=1e-4)
    assert distributed.loss_units({"labels": 2}) == 1


def test_global_batch_must_divide_by_the_processes():
    distributed.check_batch(8, distributed.Dist(world=2))
    with pytest.raises(TunelabError, match="train.batch_size.*7 is the global batch.*2 processes"):
        distributed.check_batch(7, distributed.Dist(world=2))


@pytest.mark.parametrize("weighting", ["uncertainty", "pcgrad"])
def test_multitask_recipe_on_two_processes(weighting, tmp_path, conll_dir, cls_dir, tiny_model_dir):
    """The multi-task recipe too: tasks drawn alike on every process, heads of other tasks idle in a step
    (mix one), learned loss weights used outside the model's forward (uncertainty), per-task gradients
    surgered (PCGrad, mix all); per-task losses summed over the processes."""
    from test_multitask import mt_overrides
    from tunelab.multitask import train as train_multitask

    settings = {"model.dropout": 0.0, "train.threads": 1, "train.epochs": 1, "train.batch_size": 6,
                "multitask.weighting": weighting, "multitask.mix": "all" if weighting == "pcgrad" else "one"}
    one = train_multitask(load_config(None, mt_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "one",
                                                         **settings)))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: multitask\n")
    run(accelerate_launch("-m", "tunelab", "train", str(recipe),
                          *mt_overrides(conll_dir, cls_dir, tiny_model_dir, tmp_path / "two", **settings)),
        tmp_path / "two.log")
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and two["steps"] == one["steps"]
    for a, b in zip(one["history"], two["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        assert b["tasks"].keys() == a["tasks"].keys()
        for n in a["tasks"]:
            assert b["tasks"][n] == pytest.approx(a["tasks"][n], rel=LOSS_RTOL)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_ATOL
    assert [e["step"] for e in two["evals"]] == [e["step"] for e in one["evals"]]


def test_files_the_main_process_wrote_must_be_seen_by_every_process(monkeypatch):
    d = distributed.Dist(world=2)
    monkeypatch.setattr(d, "sum", lambda values: [1.0])  # one process of two found the checkpoint
    with pytest.raises(TunelabError, match="filesystem they all share"):
        d.require_shared(True, "runs/x")
    for seen in (0.0, 2.0):  # none (a fresh run) or all
        monkeypatch.setattr(d, "sum", lambda values, seen=seen: [seen])
        d.require_shared(seen > 0, "runs/x")


@pytest.mark.parametrize("method", ["fgm", "freelb"])
def test_adversarial_training_on_two_processes(method, tmp_path, conll_dir, tiny_model_dir, odd_dev):
    """FGM takes its per-example direction from the clean backward, so two processes (each its share of the
    global batch) train as one does; FreeLB draws its starting noise per process (other shapes than one
    process's), so it is checked to run, stay in its ball and learn."""
    settings = {**SETTINGS, "train.epochs": 2, "robust.adversarial": method, "robust.epsilon": 0.5,
                "robust.alpha": 0.2, "robust.steps": 2}
    overrides = lambda out: ner_overrides(conll_dir, tiny_model_dir, out, **settings)  # noqa: E731
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: ner\n")
    run(accelerate_launch("-m", "tunelab", "train", str(recipe), *overrides(tmp_path / "two")), tmp_path / "two.log")
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and two["steps"] == 10
    assert all(0 < h["perturb/delta_norm"] <= 0.5 + 1e-5 for h in two["history"])
    if method == "fgm":
        one = train(load_config(None, overrides(tmp_path / "one")))
        # (perturb/* are the logging process's own scalars, not the global batch's: compared through their
        # effect on the later losses and the weights)
        for a, b in zip(one["history"], two["history"]):
            assert b["loss"] == pytest.approx(a["loss"], rel=LOSS_RTOL)
        wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < WEIGHT_ATOL
    else:
        losses = [h["loss"] for h in two["history"]]
        assert losses[-1] < losses[0]


def test_a_crf_trains_on_two_processes_as_on_one(tmp_path, conll_dir, tiny_model_dir):
    """model.crf under DDP: the CRF's scores get their gradient outside the model's forward (its loss is
    formed from the logits), and still all-reduce with the rest: the same losses and transitions as one
    process."""
    overrides = lambda out: ner_overrides(conll_dir, tiny_model_dir, out,  # noqa: E731
                                          **{**SETTINGS, "model.crf": True, "train.epochs": 2})
    one = train(load_config(None, overrides(tmp_path / "one")))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("task: ner\n")
    run(accelerate_launch("-m", "tunelab", "train", str(recipe), *overrides(tmp_path / "two")), tmp_path / "two.log")
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2
    for x, y in zip([h["loss"] for h in one["history"]], [h["loss"] for h in two["history"]]):
        assert y == pytest.approx(x, rel=LOSS_RTOL)
    a, b = load_file(str(tmp_path / "one" / "crf.safetensors")), load_file(str(tmp_path / "two" / "crf.safetensors"))
    assert a["transitions"].abs().max() > 0.01
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
