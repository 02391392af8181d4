"""tunelab vs the Hugging Face Trainer recipe of transformers' examples/pytorch/token-classification/run_ner.py,
side by side on CoNLL-2003 with the packaged all-MiniLM-L6-v2.

Every run gets its own fresh Python subprocess (so peak RSS is per run) with the same model, sentences, tags,
epochs, batch size, learning rate, warmup, weight decay, seed and torch threads:

  tunelab          tunelab.train.train, bf16 autocast (the shipped recipes' setting), length-grouped batches
  tunelab_fp32     the same in fp32 (optional)
  tunelab_pad8     "tunelab" with train.pad_to_multiple_of=8 (optional): fewer distinct batch shapes
  tunelab_pad1     "tunelab" with train.pad_to_multiple_of=1 (optional): padded to the longest sequence only
  tunelab_random   "tunelab" with random batches (train.group_by_length=false; optional)
  tunelab_tokens   "tunelab" with train.loss_weighting=tokens (optional): batches weighted by labelled tokens
  tunelab_pool8/2  "tunelab" with train.length_pool=8 / 2 (optional): length grouping within smaller pools
  trainer_default  Trainer as run_ner.py uses it, with its defaults: fp32, random batches
  trainer_best     Trainer with bf16=True (autocast) and length-grouped batches
  tunelab_before   "tunelab" exactly, but importing tunelab from another checkout (--before PATH), e.g. the commit
                   before a refactor: same F1 and no slower steps, measured side by side in one invocation

Both sides read the same sentences (tunelab.data.packaged.conll2003(), sliced with --max-*), and every F1 is
computed by the same function, tunelab.metrics.entity_metrics, on word-level tags. For the Trainer a word's
prediction is the argmax on its first sub-token (words cut off by truncation are predicted "O").

    python bench/ner_vs_trainer.py --epochs 1 --batch-size 32 --lr 1e-4 \\
        --runs tunelab,trainer_default,trainer_best --out bench/results/ner_vs_trainer.json

Before/after a change to tunelab (the "tunelab_before" run needs --before: a folder holding the older source
tree, with tunelab/ directly inside it, such as a git worktree; its subprocess imports tunelab from there and
nothing from this tree, and checks that it did):

    git worktree add /tmp/tunelab-before 2dc0217
    python bench/ner_vs_trainer.py --epochs 1 --batch-size 32 --lr 1e-4 --runs tunelab_before,tunelab \\
        --before /tmp/tunelab-before --out bench/results/ner_vs_before.json

The table then gains the median seconds per optimizer step (from tunelab's per-step history) and its ratio to
tunelab_before, and the summary lines compare the two runs: step time, train seconds, dev/test F1 and the
per-step training losses (identical for a behaviour-preserving change on the same machine and settings).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RUNS = ("tunelab", "tunelab_fp32", "trainer_default", "trainer_best", "tunelab_before", "tunelab_pad8", "tunelab_pad1",
        "tunelab_random", "tunelab_tokens", "tunelab_pool8", "tunelab_pool2")
# tunelab runs that differ from "tunelab" by config overrides
VARIANTS = {"tunelab_pad8": ["train.pad_to_multiple_of=8"], "tunelab_pad1": ["train.pad_to_multiple_of=1"],
            "tunelab_random": ["train.group_by_length=false"], "tunelab_tokens": ["train.loss_weighting=tokens"],
            "tunelab_pool8": ["train.length_pool=8"], "tunelab_pool2": ["train.length_pool=2"]}
# The bf16 training speed this CPU allows a MiniLM step (matmul peak 423 GFLOP/s at about 64 MFLOP per trained
# token, issue #21): each run's tokens/s is also given as a share of it.
LIMIT_TOKENS_PER_S = 6600
BASELINE = "trainer_default"
BEFORE = "tunelab_before"  # compared with AFTER, the same settings from this tree
AFTER = "tunelab"


# ----------------------------------------------------------------------------------------------------------
# Shared by both sides


def load_data(args):
    """The same Sentence objects (words + IOB2 tags) for every run."""
    from tunelab.data.packaged import conll2003

    splits = conll2003()
    if args.max_train:
        splits.train = splits.train[: args.max_train]
    if args.max_eval:
        splits.dev = splits.dev[: args.max_eval]
    if args.max_test:
        splits.test = splits.test[: args.max_test]
    return splits


def f1_summary(metrics: dict) -> dict:
    return {"f1": metrics["main"], "precision": metrics["micro"]["precision"], "recall": metrics["micro"]["recall"],
            "token_accuracy": metrics["token_accuracy"],
            "per_type_f1": {k: v["f1"] for k, v in metrics["per_type"].items()}}


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------
# tunelab


def run_tunelab(args, bf16: bool, extra: tuple = ()) -> dict:
    import torch

    from tunelab.config import load_config
    from tunelab.train import train

    torch.set_num_threads(args.threads)
    splits = load_data(args)
    out = tempfile.mkdtemp(prefix="bench_tunelab_")
    overrides = [
        "task=ner", f"output_dir={out}", "model.name=all-MiniLM-L6-v2", f"model.max_length={args.max_length}",
        "data.dataset=conll2003",  # for the config's validation only: the sliced splits are passed in below
        f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}", f"train.lr={args.lr}",
        f"train.warmup_ratio={args.warmup_ratio}", f"train.weight_decay={args.weight_decay}",
        "train.scheduler=linear", "train.max_grad_norm=1.0", "train.grad_accum=1", "train.group_by_length=true",
        f"train.seed={args.seed}", f"train.bf16={'true' if bf16 else 'false'}", "train.device=cpu",
        f"train.threads={args.threads}", "train.patience=null", "data.context_sentences=0",
    ] + list(extra)  # (none for tunelab_before: an older tree may lack the newer keys)
    cfg = load_config(None, overrides)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        report = train(cfg, splits=splits, overwrite=True)
    finally:
        total = time.perf_counter() - t0
        cpu = time.process_time() - c0
        shutil.rmtree(out, ignore_errors=True)
    losses = [h["loss"] for h in report["history"]]
    step_seconds = [h["seconds"] for h in report["history"] if h.get("seconds") is not None]
    return {
        "side": "tunelab", "bf16": bf16, "group_by_length": "train.group_by_length=false" not in extra,
        "overrides": list(extra),
        "train_seconds": report["train_seconds"], "total_seconds": total,
        "train_tokens": report["train_tokens"], "tokens_per_second": report["tokens_per_second"],
        "padding_share": report["padding_share"], "padding_measured": "every training batch (tunelab's own count)",
        "cpu_per_wall": cpu / total, "cpu_per_wall_scope": "the whole train() call",
        "steps": report["steps"], "train_loss": sum(losses) / max(1, len(losses)),
        "step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
        "step_seconds_mean": statistics.fmean(step_seconds) if step_seconds else None,
        "step_seconds_scope": "median/mean over the optimizer steps of the report's history (its per-step "
                              "'seconds': forward, backward and optimizer step; dev eval and checkpoints excluded)",
        "step_losses": losses,
        "best_step": report["best_step"], "dev_evals": len(report["evals"]),
        "dev": f1_summary(report["dev"]) if report["dev"] else None,
        "test": f1_summary(report["test"]) if report["test"] else None,
        "notes": "dev is the selected (best) evaluation; tunelab evaluates dev once per epoch and tests the best "
                 "epoch's weights" if len(report["evals"]) > 1 else "one dev evaluation, at the end",
        "total_includes": "model load, tokenisation, training, dev eval(s), resumable checkpoints (after each dev eval "
                          "and every train.save_minutes), best-weights restore, test eval, model-folder write",
    }


# ----------------------------------------------------------------------------------------------------------
# Hugging Face Trainer, as run_ner.py drives it


def encode_run_ner(tokenizer, sentences, label_to_id, max_length):
    """run_ner.py's tokenize_and_align_labels with label_all_tokens=False and no padding: truncation at
    max_length, the word's label on its first sub-token, -100 on later sub-tokens and special tokens."""
    enc = tokenizer([s.words for s in sentences], truncation=True, max_length=max_length, is_split_into_words=True)
    features, first_token, truncated = [], [], 0
    for i, s in enumerate(sentences):
        word_ids = enc.word_ids(batch_index=i)
        labels, firsts, prev = [], {}, None
        for pos, w in enumerate(word_ids):
            if w is None:
                labels.append(-100)
            elif w != prev:
                labels.append(label_to_id[s.tags[w]])
                firsts[w] = pos
            else:
                labels.append(-100)
            prev = w
        if len(firsts) < len(s.words):
            truncated += 1
        feat = {k: enc[k][i] for k in enc.keys()}
        feat["labels"] = labels
        features.append(feat)
        first_token.append(firsts)
    return features, first_token, truncated


def trainer_predict_words(trainer, features, first_token, sentences, label_list):
    """Word-level tags from trainer.predict(). The Trainer may reorder evaluation examples (with length grouping
    its eval sampler is a seeded LengthGroupedSampler), so the order is taken from its own sampler and checked
    against the label ids it returns."""
    import numpy as np

    out = trainer.predict(features)
    sampler = trainer._get_eval_sampler(features)
    order = list(sampler) if sampler is not None else list(range(len(features)))
    logits, label_ids = out.predictions, out.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    for row, i in enumerate(order):
        gold = features[i]["labels"]
        if list(label_ids[row, : len(gold)]) != gold or (label_ids[row, len(gold):] != -100).any():
            raise RuntimeError(f"Trainer prediction row {row} does not line up with example {i}; the evaluation "
                               "order is not what this benchmark assumes")
    pred_ids = np.argmax(logits, axis=-1)
    words = [None] * len(features)
    for row, i in enumerate(order):
        firsts = first_token[i]
        words[i] = [label_list[int(pred_ids[row, firsts[w]])] if w in firsts else "O"
                    for w in range(len(sentences[i].words))]
    out.metrics["eval_order_permuted"] = order != list(range(len(features)))
    return words, out.metrics


def training_args_kwargs(args, best: bool, out_dir: str) -> dict:
    """TrainingArguments for this transformers version; the names changed in v5 (group_by_length ->
    train_sampling_strategy, warmup_ratio -> a float warmup_steps)."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    kw = dict(output_dir=out_dir, per_device_train_batch_size=args.batch_size,
              per_device_eval_batch_size=args.eval_batch_size, learning_rate=args.lr,
              num_train_epochs=args.epochs, weight_decay=args.weight_decay, lr_scheduler_type="linear",
              max_grad_norm=1.0, gradient_accumulation_steps=1, seed=args.seed, use_cpu=True,
              report_to="none", save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
              bf16=best)
    if "warmup_ratio" in fields:
        kw["warmup_ratio"] = args.warmup_ratio
    else:
        kw["warmup_steps"] = args.warmup_ratio  # a float in [0, 1) is a ratio of the total steps
    if "train_sampling_strategy" in fields:
        kw["train_sampling_strategy"] = "group_by_length" if best else "random"
    else:
        kw["group_by_length"] = best
    return kw


def run_trainer(args, best: bool) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import (AutoConfig, AutoModelForTokenClassification, AutoTokenizer,
                              DataCollatorForTokenClassification, Trainer, TrainingArguments, set_seed)

    from tunelab.data import check_labels
    from tunelab.metrics import entity_metrics
    from tunelab.models import resolve_model_path

    transformers.utils.logging.set_verbosity_warning()
    splits = load_data(args)
    out = tempfile.mkdtemp(prefix="bench_trainer_")
    t0 = time.perf_counter()
    try:
        check_labels(splits.train, {"dev": splits.dev, "test": splits.test})  # same refusal as tunelab
        label_list = sorted({t for s in splits.train for t in s.tags})  # run_ner.py's get_label_list
        label_to_id = {label: i for i, label in enumerate(label_list)}
        path = str(resolve_model_path("all-MiniLM-L6-v2"))

        training_args = TrainingArguments(**training_args_kwargs(args, best, out))
        set_seed(training_args.seed)  # run_ner.py seeds before building the model
        config = AutoConfig.from_pretrained(path, num_labels=len(label_list), finetuning_task="ner")
        tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
        model = AutoModelForTokenClassification.from_pretrained(path, config=config)
        model.config.label2id = dict(label_to_id)
        model.config.id2label = dict(enumerate(label_list))

        train_feats, _, train_truncated = encode_run_ner(tokenizer, splits.train, label_to_id, args.max_length)
        dev_feats, dev_first, dev_truncated = encode_run_ner(tokenizer, splits.dev, label_to_id, args.max_length)
        test_feats, test_first, test_truncated = encode_run_ner(tokenizer, splits.test, label_to_id,
                                                                args.max_length)
        collator = DataCollatorForTokenClassification(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)
        trainer = Trainer(model=model, args=training_args, train_dataset=train_feats, processing_class=tokenizer,
                          data_collator=collator)

        t_train, c_train = time.perf_counter(), time.process_time()
        result = trainer.train()
        train_wall = time.perf_counter() - t_train
        train_cpu = time.process_time() - c_train
        train_runtime = result.metrics["train_runtime"]

        dev_words, dev_pm = trainer_predict_words(trainer, dev_feats, dev_first, splits.dev, label_list)
        test_words, test_pm = trainer_predict_words(trainer, test_feats, test_first, splits.test, label_list)
        total = time.perf_counter() - t0

        # Padding share: one pass over the Trainer's own train dataloader (after training, so that the pass does
        # not shift the random state the training run used), counting attention_mask.
        real = padded = 0
        for batch in trainer.get_train_dataloader():
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
    finally:
        shutil.rmtree(out, ignore_errors=True)

    from tunelab.data.tags import repair_iob2

    dev_m = entity_metrics([s.tags for s in splits.dev], dev_words)
    test_m = entity_metrics([s.tags for s in splits.test], test_words)
    test_rep = entity_metrics([s.tags for s in splits.test], [repair_iob2(t) for t in test_words])
    dev_rep = entity_metrics([s.tags for s in splits.dev], [repair_iob2(t) for t in dev_words])
    epoch_tokens = sum(len(f["input_ids"]) for f in train_feats)
    train_tokens = epoch_tokens * args.epochs
    return {
        "side": "trainer", "bf16": best, "group_by_length": best,
        "train_seconds": train_runtime, "train_wall_seconds": train_wall, "total_seconds": total,
        "train_tokens": train_tokens, "tokens_per_second": train_tokens / train_runtime,
        "padding_share": 1 - real / max(1, padded),
        "padding_measured": "one pass over trainer.get_train_dataloader() after training",
        "cpu_per_wall": train_cpu / train_wall, "cpu_per_wall_scope": "trainer.train()",
        "steps": result.global_step, "train_loss": result.metrics.get("train_loss"),
        "dev": f1_summary(dev_m), "test": f1_summary(test_m),
        "dev_f1_iob2_repaired": dev_rep["main"], "test_f1_iob2_repaired": test_rep["main"],
        "truncated_sentences": {"train": train_truncated, "dev": dev_truncated, "test": test_truncated},
        "predict_seconds": {"dev": dev_pm.get("test_runtime"), "test": test_pm.get("test_runtime")},
        "eval_order_permuted": dev_pm["eval_order_permuted"],
        "optimizer": training_args.optim if isinstance(training_args.optim, str) else training_args.optim.value,
        "transformers": transformers.__version__,
        "notes": "no model selection: dev and test evaluated once, after the last step",
        "total_includes": "model load, tokenisation, training, dev predict, test predict",
    }


def same_path(a, b) -> bool:
    try:
        return Path(a or ".").resolve() == Path(b).resolve()
    except OSError:
        return False


def use_tunelab_from(tree: Path) -> None:
    """Make `import tunelab` in this process read tree/tunelab: `tree` first on sys.path, this checkout's root (put
    there by this script, or the cwd) off it. The venv's editable install of this checkout is a meta-path finder
    after sys.path's, so it does not get a say once tree/tunelab is found."""
    if any(m == "tunelab" or m.startswith("tunelab.") for m in sys.modules):
        raise RuntimeError("tunelab was imported before its checkout was chosen")
    sys.path[:] = [str(tree)] + [p for p in sys.path if not same_path(p, ROOT) and not same_path(p, tree)]


def check_tunelab_source(tree: Path) -> str:
    """Every tunelab module this process has imported lies under tree (no module from another checkout leaked in);
    returns tunelab's package folder."""
    import tunelab

    tree = tree.resolve()
    wrong = sorted(f"{name} ({mod.__file__})" for name, mod in list(sys.modules.items())
                   if (name == "tunelab" or name.startswith("tunelab.")) and getattr(mod, "__file__", None)
                   and not Path(mod.__file__).resolve().is_relative_to(tree))
    if wrong:
        raise RuntimeError(f"tunelab modules imported from outside {tree}: {', '.join(wrong[:5])}")
    return str(Path(tunelab.__file__).resolve().parent)


def child_main(args) -> None:
    result = {"run": args.child}
    tree = Path(args.before) if args.child == BEFORE else ROOT
    try:
        if args.child == BEFORE:
            if not args.before:
                raise ValueError(f"{BEFORE} needs --before PATH")
            use_tunelab_from(tree)
        if args.child.startswith("tunelab"):
            result["tunelab_from"] = check_tunelab_source(tree)  # before the run, so a wrong tree runs nothing
        if args.child in ("tunelab", BEFORE):
            result.update(run_tunelab(args, bf16=True))
        elif args.child == "tunelab_fp32":
            result.update(run_tunelab(args, bf16=False))
        elif args.child in VARIANTS:
            result.update(run_tunelab(args, bf16=True, extra=VARIANTS[args.child]))
        elif args.child == "trainer_default":
            result.update(run_trainer(args, best=False))
        elif args.child == "trainer_best":
            result.update(run_trainer(args, best=True))
        else:
            raise ValueError(args.child)
        if args.child.startswith("tunelab"):
            result["tunelab_from"] = check_tunelab_source(tree)  # and every module the run imported
    except BaseException as e:
        result["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        import torch

        result["torch_threads"] = torch.get_num_threads()
        result["peak_rss_mib_self"] = peak_rss_mib()
        Path(args.child_out).write_text(json.dumps(result, indent=2))


# ----------------------------------------------------------------------------------------------------------
# Parent: one subprocess per run, table, JSON


def child_env(args, run: str = "") -> dict:
    env = dict(os.environ)
    n = str(args.threads)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS=n,
               MKL_NUM_THREADS=n, PYTHONHASHSEED=str(args.seed))
    if run == BEFORE:  # the other checkout first, this one not at all (the child also fixes sys.path and checks)
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not same_path(p, ROOT)]
        env["PYTHONPATH"] = os.pathsep.join([str(args.before), *rest])
        return env
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def git_state(tree: Path) -> dict:
    """The commit of a checkout and whether its tracked files differ from it (for the record)."""
    def git(*cmd):
        r = subprocess.run(["git", "-C", str(tree), *cmd], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"path": str(tree), "commit": commit, "modified": None if status is None else bool(status)}


def spawn(run: str, args, argv: list[str]) -> dict:
    fd, res_path = tempfile.mkstemp(prefix=f"bench_{run}_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", run, "--child-out", res_path]
    print(f"\n=== {run} ===", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=child_env(args, run), cwd=str(ROOT))
    # wait4 gives this one child's own resource usage (RUSAGE_CHILDREN would be the max over all children so far).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    try:
        text = Path(res_path).read_text()
        result = json.loads(text) if text.strip() else {"run": run}
    finally:
        Path(res_path).unlink(missing_ok=True)
    result.update(process_seconds=wall, process_cpu_seconds=usage.ru_utime + usage.ru_stime,
                  peak_rss_mib=usage.ru_maxrss / 1024, exit_code=proc.returncode,
                  loadavg_1min={"before": load_before, "after": os.getloadavg()[0]})
    if proc.returncode != 0:
        result["error"] = result.get("error") or f"subprocess exited with {proc.returncode}; see its output above"
    return result


def fmt(x, spec=".1f", none="—"):
    return none if x is None else format(x, spec)


def failed_row(r: dict, columns: int) -> str:
    """A table row for a run that failed: its name and the start of its error, the other cells empty."""
    msg = r["error"].replace("|", "/").replace("\n", " ")
    return f"| {r['run']} | failed: {msg[:160]} |" + " |" * (columns - 2)


def first_ok(results: list[dict], run: str):
    return next((r for r in results if r["run"] == run and "error" not in r), None)


def ratio(a, b):
    return a / b if a is not None and b else None


def table(results: list[dict]) -> str:
    base = first_ok(results, BASELINE)
    # With a tunelab_before run: the median seconds per optimizer step, and its ratio to tunelab_before's.
    steps = any(r["run"] == BEFORE for r in results)
    before = first_ok(results, BEFORE)
    rows = ["| run | bf16 | batches | train s | total s | train time vs default "
            + ("| s/step (median) | s/step vs before " if steps else "")
            + "| tokens/s | tokens/s vs default | padding | peak RSS MiB | CPU s per s | dev F1 | test F1 |",
            "|---|---|---|---:|---:|---:|" + ("---:|---:|" if steps else "") + "---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        if "error" in r:
            rows.append(failed_row(r, 15 if steps else 13))
            continue
        t_ratio = r["train_seconds"] / base["train_seconds"] if base else None
        s_ratio = r["tokens_per_second"] / base["tokens_per_second"] if base else None
        step_cells = ""
        if steps:
            b_ratio = (ratio(r.get("step_seconds_median"), before["step_seconds_median"])
                       if before and r["run"] in (AFTER, BEFORE) else None)
            step_cells = (f"| {fmt(r.get('step_seconds_median'), '.3f')} "
                          f"| {fmt(b_ratio, '.3f')}{'×' if b_ratio is not None else ''} ")
        rows.append(
            f"| {r['run']} | {'yes' if r['bf16'] else 'no'} | {'length-grouped' if r['group_by_length'] else 'random'} "
            f"| {fmt(r['train_seconds'])} | {fmt(r['total_seconds'])} | {fmt(t_ratio, '.2f')}{'×' if base else ''} "
            f"{step_cells}"
            f"| {fmt(r['tokens_per_second'], ',.0f')} | {fmt(s_ratio, '.2f')}{'×' if base else ''} | {r['padding_share']:.1%} "
            f"| {fmt(r['peak_rss_mib'], ',.0f')} | {fmt(r.get('cpu_per_wall'), '.2f')} "
            f"| {fmt(r['dev'] and r['dev']['f1'], '.4f')} "
            f"| {fmt(r['test'] and r['test']['f1'], '.4f')} |")
    return "\n".join(rows)


def vs_before(args, results) -> dict | None:
    """tunelab (this tree) against tunelab_before (--before), both bf16 with the same settings: step time, train
    time, F1 and per-step losses. None unless both ran."""
    after, before = first_ok(results, AFTER), first_ok(results, BEFORE)
    if not (after and before):
        return None

    def f1(r, split):
        return r[split]["f1"] if r.get(split) else None

    la, lb = after.get("step_losses") or [], before.get("step_losses") or []
    same_len = len(la) == len(lb)
    return {
        "after": {"run": AFTER, "tunelab_from": after.get("tunelab_from")},
        "before": {"run": BEFORE, "tunelab_from": before.get("tunelab_from"), **git_state(Path(args.before))},
        "step_seconds_median": {"after": after.get("step_seconds_median"), "before": before.get("step_seconds_median"),
                                "ratio": ratio(after.get("step_seconds_median"), before.get("step_seconds_median"))},
        "step_seconds_mean": {"after": after.get("step_seconds_mean"), "before": before.get("step_seconds_mean"),
                              "ratio": ratio(after.get("step_seconds_mean"), before.get("step_seconds_mean"))},
        "train_seconds": {"after": after["train_seconds"], "before": before["train_seconds"],
                          "ratio": ratio(after["train_seconds"], before["train_seconds"])},
        "steps": {"after": after["steps"], "before": before["steps"]},
        "dev_f1": {"after": f1(after, "dev"), "before": f1(before, "dev"),
                   "same": f1(after, "dev") == f1(before, "dev")},
        "test_f1": {"after": f1(after, "test"), "before": f1(before, "test"),
                    "same": f1(after, "test") == f1(before, "test")},
        "step_losses": {"same": same_len and la == lb,
                        "max_abs_diff": max((abs(a - b) for a, b in zip(la, lb)), default=None) if same_len else None,
                        "steps": [len(la), len(lb)]},
    }


def vs_before_lines(cmp: dict) -> list[str]:
    b = cmp["before"]
    where = f"{b['path']} @ {(b['commit'] or '?')[:10]}{' + uncommitted changes' if b['modified'] else ''}"
    st, tr = cmp["step_seconds_median"], cmp["train_seconds"]
    lines = [f"{AFTER} vs {BEFORE} ({where}): median s/step {fmt(st['after'], '.4f')} vs {fmt(st['before'], '.4f')}"
             f" = {fmt(st['ratio'], '.3f')}× (≤ 1 is no slower); train s {fmt(tr['after'])} vs {fmt(tr['before'])} = "
             f"{fmt(tr['ratio'], '.3f')}×; steps {cmp['steps']['after']} vs {cmp['steps']['before']}"]
    for split in ("dev", "test"):
        c = cmp[f"{split}_f1"]
        diff = c["after"] - c["before"] if c["after"] is not None and c["before"] is not None else None
        lines.append(f"{AFTER} vs {BEFORE}: {split} F1 {fmt(c['after'], '.4f')} vs {fmt(c['before'], '.4f')} "
                     f"({'identical' if c['same'] else 'DIFFERENT, Δ ' + fmt(diff, '+.6f')})")
    sl = cmp["step_losses"]
    lines.append(f"{AFTER} vs {BEFORE}: per-step training losses "
                 + ("identical" if sl["same"] else
                    f"DIFFERENT (max |Δ| {fmt(sl['max_abs_diff'], '.3g')})" if sl["max_abs_diff"] is not None else
                    f"DIFFERENT (step counts {sl['steps'][0]} vs {sl['steps'][1]})")
                 + f" over {sl['steps'][0]} steps")
    return lines


def notes(args, results) -> list[str]:
    out = [
        "F1: entity micro-F1, tunelab.metrics.entity_metrics (seqeval strict IOB2) on word-level tags for every run.",
        "Trainer: word tag = argmax on the word's first sub-token; raw argmax tags are scored (tunelab repairs "
        "stray I- tags to B- before scoring; the Trainer's repaired F1 is in the JSON as *_f1_iob2_repaired).",
        "Trainer: no model selection, dev and test evaluated once at the end. tunelab: no early stopping.",
        "train s: tunelab's own training-loop seconds (dev eval and checkpoint writes excluded); Trainer's "
        "train_runtime (eval_strategy=no, save_strategy=no). tokens/s: real (non-pad) tokens incl. [CLS]/[SEP] per "
        "training second. Padding: tunelab counts every training batch; Trainer: one pass over its train "
        "dataloader.",
        f"Ratios relative to {BASELINE}: train time (lower is faster) and tokens/s (higher is faster).",
        "CPU s per s: process CPU-seconds per wall-second while training (tunelab: whole train() call; Trainer: "
        "trainer.train()); well under the thread count means the CPU was shared with other work.",
    ]
    if any(r["run"] == BEFORE for r in results):
        out.append(f"s/step: median of the per-step seconds in tunelab's report history (forward, backward, optimizer "
                   f"step; dev eval and checkpoints excluded); vs before: ratio to {BEFORE}'s (tunelab imported "
                   f"from --before), lower is faster. The runs ran one after the other, not at once.")
        cmp = vs_before(args, results)
        if cmp:
            out.extend(vs_before_lines(cmp))
    ok = [r for r in results if "error" not in r]
    out.append("Share of the CPU's limit (about 6,600 tokens/s for a bf16 MiniLM step on the 2-core development "
               "machine): " + ", ".join(f"{r['run']} {r['tokens_per_second'] / LIMIT_TOKENS_PER_S:.0%}" for r in ok))
    best = first_ok(results, "trainer_best")
    for r in ok:
        if best and r is not best and r["run"].startswith("tunelab") and r["bf16"]:
            out.append(f"{r['run']} vs trainer_best: {r['tokens_per_second'] / best['tokens_per_second']:.3f}x the "
                       f"training tokens/s, {r['peak_rss_mib'] / best['peak_rss_mib']:.3f}x the peak RSS, test F1 "
                       f"{fmt(r['test'] and r['test']['f1'], '.4f')} vs {fmt(best['test'] and best['test']['f1'], '.4f')}")
    busy = [f"{r['run']} ({r['cpu_per_wall']:.2f})" for r in results
            if r.get("cpu_per_wall") is not None and r["cpu_per_wall"] < 0.75 * args.threads]
    if busy:
        out.append(f"WARNING: CPU-seconds per wall-second during training fell well below the {args.threads} torch "
                   f"threads for {', '.join(busy)}: the machine was busy with other work, so these timings are "
                   "not reliable. Rerun on an idle machine.")
    if args.epochs > 1 and any(r["run"].startswith("tunelab") for r in results):
        out.append(f"epochs={args.epochs:g} > 1: tunelab evaluated dev after each epoch and kept the best dev "
                   "epoch's weights (its dev and test F1 are for that epoch); the Trainer uses its last step.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads in every run")
    p.add_argument("--max-length", type=int, default=256, help="sub-word tokens per sequence, [CLS]/[SEP] included")
    p.add_argument("--eval-batch-size", type=int, default=64,
                   help="Trainer per_device_eval_batch_size (tunelab's prediction batch is 64)")
    p.add_argument("--max-train", type=int, default=None, help="first N training sentences")
    p.add_argument("--max-eval", type=int, default=None, help="first N dev sentences")
    p.add_argument("--max-test", type=int, default=None, help="first N test sentences")
    p.add_argument("--runs", default="tunelab,trainer_default,trainer_best",
                   help=f"comma-separated, in order, from: {', '.join(RUNS)}")
    p.add_argument("--out", default="bench/results/ner_vs_trainer.json")
    p.add_argument("--before", metavar="PATH",
                   help=f"a folder holding another tunelab source tree (PATH/tunelab/__init__.py), e.g. a git "
                        f"worktree of an older commit: the {BEFORE} run imports tunelab from there")
    p.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.child:
        child_main(args)
        return 0

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad or not runs:
        p.error(f"--runs: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(RUNS)}")
    if args.before:
        args.before = str(Path(args.before).expanduser().resolve())
        if not (Path(args.before) / "tunelab" / "__init__.py").is_file():
            p.error(f"--before {args.before}: no tunelab/__init__.py in it (give the folder that holds tunelab/)")
        if same_path(args.before, ROOT):
            p.error("--before is this checkout; give another one (e.g. git worktree add /tmp/tunelab-before REV)")
    elif BEFORE in runs:
        p.error(f"--runs {BEFORE} needs --before PATH")
    child_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
    child_argv = strip_option(child_argv, "--runs")
    child_argv = strip_option(child_argv, "--out")
    child_argv = strip_option(child_argv, "--before")
    if args.before:
        child_argv += ["--before", args.before]  # absolute: the children run in this checkout's root

    splits = load_data(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results = [spawn(run, args, child_argv) for run in runs]

    import platform

    import torch
    import transformers

    from tunelab.io import atomic_write_json

    doc = {
        "benchmark": "tunelab vs Hugging Face Trainer (run_ner.py recipe), CoNLL-2003 NER, all-MiniLM-L6-v2",
        "started": started, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "warmup_ratio", "weight_decay",
                                                   "seed", "threads", "max_length", "eval_batch_size",
                                                   "max_train", "max_eval", "max_test")},
        "data": {"train": len(splits.train), "dev": len(splits.dev), "test": len(splits.test),
                 "source": splits.about},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
                        "machine": platform.machine(), "processor": platform.processor()},
        "baseline": BASELINE, "notes": notes(args, results), "runs": results,
    }
    if BEFORE in runs:
        doc["vs_before"] = vs_before(args, results)
    out = Path(args.out)
    atomic_write_json(out, doc)

    print()
    print(f"CoNLL-2003 NER, all-MiniLM-L6-v2: {len(splits.train)} train / {len(splits.dev)} dev / "
          f"{len(splits.test)} test sentences, {args.epochs:g} epoch(s), batch {args.batch_size}, lr {args.lr:g}, "
          f"{args.threads} torch threads, CPU")
    print()
    print(table(results))
    print()
    for n in doc["notes"]:
        print(f"- {n}")
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in results) else 0


def strip_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE` (the parent's options that children do not take)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == name:
            skip = True
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
