"""Prompting and continued pre-training on real data, each run a separate process, one after the other:

  zero     zero-shot classification by SmolLM2-135M-Instruct's next words (task: prompt, train.epochs=0),
           plain, calibrated (contextual calibration), and in its chat template
  icl      in-context few-shot: 4 demonstrations drawn from a 32-per-class training sample, at random (3 seeds)
           or the most similar by MiniLM, calibrated; and the random ones uncalibrated
  curve    pattern-exploiting training (task: prompt, LoRA) against a classification head on the same backbone
           (task: classify, LoRA, the same steps, learning rate and examples), at 8/32/128/512 training examples
           per class (data.per_label, seeded; 3 seeds where --seeds says, see --curve-seeds)
  dapt     task-adaptive continued pre-training of MiniLM (`tunelab pretrain`, whole-word MLM on the CoNLL-2003
           training documents' text) before low-resource NER fine-tuning (the first 1,000 training sentences),
           against the same fine-tuning from MiniLM itself, 3 seeds
  dapt-bbc the same on BBC News: MLM on the training articles' text, then topic classification from 8
           articles per class (MiniLM's classification head), 3 seeds
  ner      NER as prompting: SmolLM2 writes "entity [TYPE]; ..." after 4 demonstrations, parsed back to spans
           and scored with seqeval on CoNLL-2003 test sentences

Sets: rt_sentiment (fresh/rotten; dev: 100 of the dev split, test: a stratified 400 of the test split, seed 0)
and bbc_news (5 topics; dev: 100 of the dev split, test: all 314). The samples are written once into the work
folder as JSONL and every run reads the same files. Selection is on that dev sample; each test is run once.

    .venv/bin/python bench/prompting.py --parts zero,icl,curve,dapt,ner --out bench/results/prompting.json

With --out, each finished run is written at once and runs already there are kept: a killed bench continues.
"""

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LM = "SmolLM2-135M-Instruct"
SETS = {
    "rt": {"name": "rt_sentiment", "template": "Review: {text}\nSentiment:",
           "verbalizer": {"fresh": ["positive"], "rotten": ["negative"]}, "max_length": 128, "test": 400},
    "bbc": {"name": "bbc_news", "template": "Article: {text}\nTopic:",
            "verbalizer": {"business": ["business"], "entertainment": ["entertainment"], "politics": ["politics"],
                           "sports": ["sports"], "tech": ["technology"]}, "max_length": 160, "test": None},
}
STEPS = {8: 40, 32: 60, 128: 100, 512: 150}
TRAIN = """
import sys
from tunelab.config import load_config
from tunelab.train import train
train(load_config(None, sys.argv[1:]), overwrite=True)
"""


def stratified_sample(examples, n, seed):
    by = {}
    for e in examples:
        by.setdefault(e.label, []).append(e)
    rng = random.Random(seed)
    out = []
    for label in sorted(by):
        share = round(n * len(by[label]) / len(examples))
        out += rng.sample(by[label], min(share, len(by[label])))
    return sorted(out, key=examples.index)


def write_set(key: str, work: Path) -> dict:
    """train / dev / test JSONL of a set (once), as every run reads them."""
    from tunelab.data import load_builtin

    folder = work / key
    if not (folder / "test.jsonl").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        s = load_builtin(SETS[key]["name"])
        parts = {"train": s.train, "dev": stratified_sample(s.dev, 100, 0),
                 "test": stratified_sample(s.test, SETS[key]["test"], 0) if SETS[key]["test"] else s.test}
        for split, examples in parts.items():
            (folder / f"{split}.jsonl").write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n"
                                                           for e in examples), encoding="utf-8")
    return {split: str(folder / f"{split}.jsonl") for split in ("train", "dev", "test")}


def prompt_overrides(key: str) -> list[str]:
    s = SETS[key]
    return ["task=prompt", f"model.name={LM}", f"model.max_length={s['max_length']}",
            f"data.prompt.template={s['template']}"] + [
        f"data.prompt.verbalizer.{label}={json.dumps(words)}" for label, words in s["verbalizer"].items()]


def run_train(overrides: list[str], out: Path, env) -> dict:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", TRAIN, f"output_dir={out}", *overrides], cwd=ROOT, env=env, check=True)
    r = json.loads((out / "report.json").read_text())
    return {"test": {k: r["test"][k] for k in ("main", "accuracy")}, "dev": r["dev"]["main"] if r["dev"] else None,
            "steps": r["steps"], "best_step": r["best_step"], "train_seconds": r["train_seconds"],
            "peak_memory_mb": r["peak_memory_mb"], "wall_seconds": time.perf_counter() - t0}


def common(files, threads) -> list[str]:
    return [f"data.train={files['train']}", f"data.dev={files['dev']}", f"data.test={files['test']}",
            f"train.threads={threads}", "train.bf16=true", "train.device=cpu"]


def plan(args) -> list[tuple[str, list[str], str]]:
    """(run name, overrides, kind) of every run the chosen parts make."""
    runs = []
    for key in args.sets:
        base = prompt_overrides(key)
        if "zero" in args.parts:
            runs += [(f"{key}/zero", base + ["train.epochs=0"], "train"),
                     (f"{key}/zero-calibrated", base + ["train.epochs=0", "data.prompt.calibrate=true"], "train"),
                     (f"{key}/zero-chat", base + ["train.epochs=0", "data.prompt.chat=true"], "train")]
        if "icl" in args.parts:
            icl = base + ["train.epochs=0", "data.per_label=32", "data.prompt.shots=4", "data.prompt.calibrate=true",
                          "data.prompt.demo_tokens=64", f"model.max_length={SETS[key]['max_length'] + 4 * 80}"]
            runs += [(f"{key}/icl-random-{s}", icl + [f"data.sample_seed={s}", f"data.prompt.seed={s}"], "train")
                     for s in args.seeds]
            runs += [(f"{key}/icl-similar-{s}", icl + [f"data.sample_seed={s}", "data.prompt.select=similar"],
                      "train") for s in args.seeds]
            runs += [(f"{key}/icl-random-uncalibrated-{s}", icl + [f"data.sample_seed={s}", f"data.prompt.seed={s}",
                                                                   "data.prompt.calibrate=false"], "train")
                     for s in args.seeds]
        if "curve" in args.parts:
            for k in args.per_label:
                seeds = args.seeds if k <= args.curve_seeds_up_to else args.seeds[:1]
                for s in seeds:
                    shared = [f"data.per_label={k}", f"data.sample_seed={s}", f"train.seed={s}", "tune.method=lora",
                              "train.lr=5e-4", "train.batch_size=8", "train.epochs=1000", f"train.max_steps={STEPS[k]}",
                              "train.eval_every=20", "train.warmup_ratio=0.1"]
                    runs.append((f"{key}/pet-{k}-{s}", base + shared, "train"))
                    runs.append((f"{key}/head-{k}-{s}", ["task=classify", f"model.name={LM}",
                                                          f"model.max_length={SETS[key]['max_length']}"] + shared,
                                 "train"))
    if "dapt" in args.parts:
        runs.append(("conll/dapt-pretrain", [], "pretrain"))
        for s in args.seeds:
            for start in ("minilm", "dapt"):
                runs.append((f"conll/{start}-1000-{s}", [f"train.seed={s}"], "ner"))
    if "dapt-bbc" in args.parts:
        runs.append(("bbc/dapt-pretrain", [], "pretrain-bbc"))
        for s in args.seeds:
            for start in ("minilm", "dapt"):
                runs.append((f"bbc/{start}-8-{s}", ["task=classify", "model.max_length=256", "data.per_label=8",
                                                    f"data.sample_seed={s}", f"train.seed={s}", "train.epochs=20",
                                                    "train.batch_size=8", "train.lr=1e-4", "train.eval_every=25"],
                             "train"))
    if "ner" in args.parts:
        runs.append(("conll/ner-prompting", [], "ner-prompting"))
    return runs


def pretrain(work: Path, threads: int, env, text="conll2003_text", folder="dapt", extra=()) -> dict:
    out = work / folder
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", "pretrain", "--model", "all-MiniLM-L6-v2", "--text",
                    text, "-o", str(out), "model.max_length=128", "train.epochs=3", "train.batch_size=32",
                    "train.lr=1e-4", "data.pretrain.whole_word=true", f"train.threads={threads}", "train.bf16=true",
                    "train.device=cpu", *extra, "--overwrite"], cwd=ROOT, env=env, check=True)
    r = json.loads((out / "report.json").read_text())
    first = r["evals"][0]["metrics"]
    return {"dev_first_eval": {k: first[k] for k in ("loss", "masked_accuracy")},
            "dev": {k: r["dev"][k] for k in ("loss", "perplexity", "masked_accuracy")},
            "train_seconds": r["train_seconds"], "steps": r["steps"], "tokens": r["train_tokens"],
            "wall_seconds": time.perf_counter() - t0}


def ner(name: str, overrides, work: Path, threads: int, env) -> dict:
    start = name.split("/")[1].split("-")[0]
    model = str(work / "dapt") if start == "dapt" else "all-MiniLM-L6-v2"
    out = work / name.replace("/", "_")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunelab", "train", str(ROOT / "recipes" / "conll2003_quick.yaml"),
                    f"output_dir={out}", f"model.name={model}", "data.max_train_examples=1000", "train.epochs=4",
                    f"train.threads={threads}", *overrides, "--overwrite"], cwd=ROOT, env=env, check=True)
    r = json.loads((out / "report.json").read_text())
    return {"test": {"f1": r["test"]["main"]}, "dev": r["dev"]["main"], "train_seconds": r["train_seconds"],
            "wall_seconds": time.perf_counter() - t0}


ENTITY = re.compile(r"\s*(.+?)\s*\[(PER|LOC|ORG|MISC)\]\s*$")


def spans_to_tags(words: list[str], output: str) -> list[str]:
    """'Obama [PER]; Hawaii [LOC]' -> IOB2 tags: each entity at its first occurrence not yet taken (words
    compared as written); items that do not parse or are not in the sentence are dropped."""
    tags = ["O"] * len(words)
    for item in output.split(";"):
        m = ENTITY.match(item)
        if not m:
            continue
        ent, kind = m.group(1).split(), m.group(2)
        for i in range(len(words) - len(ent) + 1):
            if words[i:i + len(ent)] == ent and all(t == "O" for t in tags[i:i + len(ent)]):
                tags[i:i + len(ent)] = ["B-" + kind] + ["I-" + kind] * (len(ent) - 1)
                break
    return tags


def entity_list(words, tags) -> str:
    items, cur = [], None
    for w, t in zip(words, tags):
        if t.startswith("B-"):
            cur = [w, t[2:]]
            items.append(cur)
        elif t.startswith("I-") and cur:
            cur[0] += " " + w
        else:
            cur = None
    return "; ".join(f"{w} [{k}]" for w, k in items) or "none"


def ner_prompting(threads: int, n: int = 200, shots: int = 4) -> dict:
    """SmolLM2 writes the entity list after `shots` demonstrations (training sentences with entities of
    every type, fixed), greedily; the test sentences are the first `n` of the test split."""
    import torch
    from seqeval.metrics import f1_score, precision_score, recall_score
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data import load_builtin
    from tunelab.models import resolve_model_path

    torch.set_num_threads(threads)
    s = load_builtin("conll2003")
    demos, seen = [], set()
    for sent in s.train:  # the first short sentences that together show every type
        types = {t[2:] for t in sent.tags if t != "O"}
        if 6 <= len(sent.words) <= 20 and types - seen:
            demos.append(sent)
            seen |= types
        if len(demos) == shots:
            break
    head = "Find the named entities (PER person, LOC location, ORG organisation, MISC other) in each sentence.\n\n"
    head += "".join(f"Sentence: {' '.join(d.words)}\nEntities: {entity_list(d.words, d.tags)}\n\n" for d in demos)
    path = resolve_model_path(LM)
    tok = AutoTokenizer.from_pretrained(str(path), padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    test = [x for x in s.test if x.tags][:n]
    gold, pred, t0 = [], [], time.perf_counter()
    for k in range(0, len(test), 8):
        batch = test[k:k + 8]
        enc = tok([head + f"Sentence: {' '.join(x.words)}\nEntities:" for x in batch], return_tensors="pt",
                  padding=True)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            out = model.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
        for x, row in zip(batch, out[:, enc["input_ids"].shape[1]:]):
            text = tok.decode(row, skip_special_tokens=True).split("\n")[0]
            gold.append(x.tags)
            pred.append(spans_to_tags(x.words, text))
    return {"sentences": len(test), "shots": shots, "f1": f1_score(gold, pred), "precision": precision_score(gold, pred),
            "recall": recall_score(gold, pred), "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="zero,icl,curve,dapt,dapt-bbc,ner")
    p.add_argument("--sets", default="rt,bbc")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--per-label", default="8,32,128,512")
    p.add_argument("--curve-seeds-up-to", type=int, default=32,
                   help="curve sizes above this run the first seed only (CPU time)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=str(ROOT / "bench" / "results" / "prompting-runs"))
    p.add_argument("--out")
    p.add_argument("--only", help="a regular expression: run only the matching run names")
    args = p.parse_args()
    args.parts, args.sets = args.parts.split(","), args.sets.split(",")
    args.seeds = [int(x) for x in args.seeds.split(",")]
    args.per_label = [int(x) for x in args.per_label.split(",")]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = json.loads(Path(args.out).read_text()) if args.out and Path(args.out).is_file() else {}
    files = {key: write_set(key, work) for key in args.sets}
    for name, overrides, kind in plan(args):
        if name in done or (args.only and not re.search(args.only, name)):
            continue
        print(f"== {name}", flush=True)
        if kind == "train":
            key = name.split("/")[0]
            start = name.split("/")[1].split("-")[0]
            model = {"minilm": ["model.name=all-MiniLM-L6-v2"], "dapt": [f"model.name={work / 'dapt-bbc'}"]}
            row = run_train(overrides + model.get(start, []) + common(files[key], args.threads),
                            work / name.replace("/", "_"), env)
        elif kind == "pretrain":
            row = pretrain(work, args.threads, env)
        elif kind == "pretrain-bbc":
            row = pretrain(work, args.threads, env, "bbc_news_text", "dapt-bbc",
                           ["model.max_length=256", "train.epochs=1", "train.batch_size=16"])
        elif kind == "ner":
            row = ner(name, overrides, work, args.threads, env)
        else:
            row = ner_prompting(args.threads)
        done[name] = row
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(done, indent=1))
    print(table(done))


def table(done: dict) -> str:
    """Mean ± std over seeds of the test main score (macro-F1; NER: entity F1), by run without its seed."""
    groups = {}
    for name, row in done.items():
        if "test" not in row:
            continue
        base = re.sub(r"-\d+$", "", name)
        groups.setdefault(base, []).append(100 * (row["test"].get("main", row["test"].get("f1"))))
    lines = ["| run | test (macro-F1 / F1) | seeds |", "|---|---:|---:|"]
    for base, values in groups.items():
        sd = f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else ""
        lines.append(f"| {base} | {statistics.mean(values):.1f}{sd} | {len(values)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
