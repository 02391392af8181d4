"""The `tunelab` command. A user's mistake (bad file, key, path) prints one line and exits 2; no traceback."""

import argparse
import json
import sys
from pathlib import Path

from tunelab.errors import TunelabError

EPILOG = """examples:
  tunelab train recipes/conll2003_ner.yaml train.epochs=1 output_dir=runs/ner
  tunelab eval runs/ner --data conll2003:test
  tunelab predict runs/ner "Angela Merkel visited Paris ."
  tunelab predict runs/ner sentences.txt -o entities.jsonl
  tunelab train recipes/multitask_en.yaml output_dir=runs/mtl
  tunelab predict runs/mtl --task sentiment "A gorgeous, witty film ."
  tunelab export runs/mtl --task ner runs/ner-only
  tunelab export runs/ner runs/ner-onnx --onnx
  tunelab serve runs/ner --port 8000
  tunelab runs runs/
  tunelab compare runs/ner runs/ner-lora --metric dev/micro/f1 --out compare.png
  accelerate launch --multi_gpu --num_processes 2 -m tunelab train recipes/conll2003_ner.yaml
  tunelab search recipes/conll2003_quick.yaml --space recipes/search/lr.yaml --trials 12 --out runs/search
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune pretrained transformers on NLP tasks.",
                                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model from a YAML recipe",
                       description="Fine-tune a model. The recipe (YAML) fills the config; key.sub=value "
                                   "arguments override it (e.g. train.lr=3e-5 data.context_sentences=2). "
                                   "Unknown keys are errors. See recipes/ for shipped recipes.")
    t.add_argument("recipe", help="recipe YAML file")
    t.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in output_dir from its last checkpoint")
    t.add_argument("--overwrite", action="store_true", help="delete output_dir's contents and start again")

    pt = sub.add_parser("pretrain", help="continue pre-training a model on raw text (masked LM for encoders, "
                                         "causal LM for decoders) before fine-tuning it",
                        description="Continued pre-training (task: pretrain): MLM for an encoder (its MLM head added "
                                    "when the model lacks one), CLM for a decoder, on raw text: a .txt file (one "
                                    "document a line), JSONL with a text field, a folder of .txt files (one "
                                    "document each), or a built-in text set (conll2003_text, bbc_news_text, "
                                    "peoples_daily_text, inews_text). The output folder is a backbone for any "
                                    "recipe's model.name. A recipe is optional: the flags and key.sub=value "
                                    "overrides (train.epochs=1 data.pretrain.whole_word=true ...) fill the config.")
    pt.add_argument("recipe", nargs="?", help="recipe YAML with task: pretrain (optional)")
    pt.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    pt.add_argument("--model", help="the model to continue (model.name)")
    pt.add_argument("--text", help="the training text: a file, a folder or a built-in text set (data.train or "
                                   "data.dataset)")
    pt.add_argument("--dev", help="held-out text for dev selection (data.dev)")
    pt.add_argument("--output", "-o", help="the output folder (output_dir)")
    pt.add_argument("--resume", action="store_true", help="continue the interrupted run in output_dir")
    pt.add_argument("--overwrite", action="store_true", help="delete output_dir's contents and start again")

    e = sub.add_parser("eval", help="evaluate a trained model folder on labelled data",
                       description="Evaluate a model folder saved by `tunelab train`.")
    e.add_argument("model_dir")
    e.add_argument("--data", required=True,
                   help="a built-in set and split (conll2003:test, bbc_news:dev, ...) or a labelled file")
    _file_options(e)
    e.add_argument("--output", "-o", help="also write the metrics (JSON) here")
    e.add_argument("--predictions", help="write the predictions here (.conll for NER columns, else JSONL)")
    e.add_argument("--task", help="multi-task folders: the task to evaluate")
    e.add_argument("--perturb", metavar="OP=P,...",
                   help="robustness: also score a seeded perturbed copy of the data, each operation applied to an "
                        "example with probability P (char_noise, case, swap, delete, insert, neighbours, mentions; "
                        "e.g. char_noise=0.05,mentions=0.2), and report clean, perturbed and the drop")
    e.add_argument("--perturb-intensity", type=float, default=0.1,
                   help="--perturb: how much an operation changes, as a share of words or characters "
                        "(default: %(default)s)")
    e.add_argument("--perturb-seed", type=int, default=0, help="--perturb: the seed (default: %(default)s)")
    e.add_argument("--plot", metavar="PNG", help="--perturb: a bar chart of clean vs perturbed scores")
    e.add_argument("--report", metavar="MD", help="--perturb: a Markdown report of clean vs perturbed scores and "
                                                 "the drop, per entity type or class (with the --plot chart)")

    r = sub.add_parser("predict", help="predict with a trained model folder",
                       description="Predict on a text given on the command line, or a file: .txt (one text a "
                                   "line; one that looks like CoNLL columns needs --format conll or --format "
                                   "text), .conll (words in the first column), .jsonl (a 'text' field, "
                                   "'prompt' for generation, or 'tokens' for NER) or .csv. Output is JSONL (or "
                                   "CoNLL columns with -o X.conll). Files of any size are streamed in chunks; "
                                   "the output file appears only when every chunk is done.")
    r.add_argument("model_dir")
    r.add_argument("input", help="a file path, or the text itself")
    _file_options(r)
    r.add_argument("--output", "-o", help="output file (default: standard output)")
    r.add_argument("--task", help="multi-task folders: the task to predict")
    r.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="a bad input line (not UTF-8, not JSON, a missing or empty field): fail the run before "
                        "writing anything (exit 2), or report it and leave it out (default: %(default)s)")
    r.add_argument("--chunk-size", type=int, default=1000,
                   help="examples read and predicted at a time; memory holds one chunk (default: %(default)s)")
    r.add_argument("--max-new-tokens", type=int, help="generation: at most this many new tokens (default and "
                                                      "maximum: the model's data.max_target_length)")

    x = sub.add_parser("export", help="write a model for use elsewhere: one task of a multi-task folder as a "
                                      "plain transformers model, or an encoder model as ONNX (--onnx)",
                       description="Without --onnx: export task NAME of a multi-task folder as a standalone model "
                                   "folder that plain transformers loads (AutoModelFor... with id2label; a per-task "
                                   "LoRA adapter is merged into the weights) and tunelab predict/eval/serve use. "
                                   "With --onnx: export an NER or classification model (any folder; --task NAME "
                                   "for a multi-task one) as OUTPUT/model.onnx with its config and tokenizer, "
                                   "after checking onnxruntime's logits against PyTorch's on real inputs "
                                   "(needs the onnx extra). Generation models are not exported to ONNX.")
    x.add_argument("model_dir")
    x.add_argument("--task", help="the task to export (required for a multi-task folder)")
    x.add_argument("output", help="the folder to write (must not exist or be empty)")
    x.add_argument("--onnx", action="store_true", help="write ONNX (model.onnx) instead of transformers weights")
    x.add_argument("--atol", type=float, default=1e-4,
                   help="--onnx: largest allowed |onnxruntime - torch| logit difference (default: %(default)g)")
    x.add_argument("--check-data", metavar="FILE",
                   help="--onnx: check parity on the first 32 inputs of this file (text lines, JSONL, CSV; "
                        "default: a few built-in sentences)")
    _quantize_options(x, "--onnx: write the graph")

    s = sub.add_parser("serve", help="serve a trained model folder over HTTP",
                       description="An HTTP server for a model folder: GET /health, /ready, /metrics, /v1/model; "
                                   "POST /v1/predict {\"texts\": [...], \"task\": ...}; OpenAPI at /openapi.json. "
                                   "Concurrent requests share forward passes (micro-batching); a full queue "
                                   "answers 503 with Retry-After.")
    s.add_argument("model_dir")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine "
                                                       "only; 0.0.0.0 for every interface)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--workers", type=int, default=1, help="processes, each with its own copy of the model")
    s.add_argument("--threads", type=int, help="torch threads per worker (default: torch's choice)")
    s.add_argument("--device", default="auto")
    s.add_argument("--bf16", action="store_true",
                   help="bf16 autocast, as the recipes train and evaluate: about 2x the throughput on CPUs with "
                        "bf16 instructions; logits differ from float32 in the second or third digit")
    _quantize_options(s, "serve the model")
    s.add_argument("--max-batch", type=int, default=32, help="texts per forward pass (default: %(default)s)")
    s.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a batch waits for more texts (default: %(default)s)")
    s.add_argument("--queue-size", type=int, default=256,
                   help="texts waiting for the model before requests get 503 (default: %(default)s)")
    s.add_argument("--max-texts", type=int, default=64, help="texts per request (default: %(default)s)")
    s.add_argument("--max-chars", type=int, default=10_000, help="characters per text (default: %(default)s)")
    s.add_argument("--max-body-bytes", type=int, default=1_000_000, help="request body size (default: %(default)s)")
    s.add_argument("--api-key-env", default="TUNELAB_API_KEY", metavar="NAME",
                   help="when this environment variable is set, /v1/ requests need its value as "
                        "'Authorization: Bearer KEY' or 'X-API-Key: KEY' (default: %(default)s)")
    s.add_argument("--api-key-file", metavar="PATH", help="read the API key from this file instead")
    s.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="another adapter trained on the same base, chosen per request by name (repeatable)")
    s.add_argument("--no-access-log", action="store_true", help="do not log a line per request")

    ls = sub.add_parser("runs", help="list the runs under a folder with their key config and best metrics",
                        description="List every run folder (config.yaml with report.json, or an unfinished run's "
                                    "checkpoint) at or under DIR: task, model, tuning method, lr, epochs, seed, "
                                    "steps, best dev score and test score. Markdown table, or JSON.")
    ls.add_argument("dir")
    ls.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")

    c = sub.add_parser("compare", help="compare runs: a table and overlaid curves of chosen metrics",
                       description="A table (Markdown, or --json) of the runs' key config and each metric's best "
                                   "and last value, and with --out a PNG of the metrics' curves overlaid. Metric "
                                   "names are TensorBoard's: train/loss, train/lr, train/tokens_per_second, "
                                   "dev/main (what selection maximises), dev/micro/f1, dev/macro_f1, "
                                   "dev/TASK/... for multi-task runs; an unknown name lists the run's metrics.")
    c.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    c.add_argument("--metric", action="append", dest="metrics", metavar="NAME",
                   help="a metric to compare (repeatable; default: train/loss and dev/main)")
    c.add_argument("--out", help="write the curves here (PNG)")
    c.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")

    h = sub.add_parser("search", help="hyper-parameter search over a recipe (Optuna): trials are runs, selection "
                                      "on dev, the test split once at the end",
                       description="Search the recipe's config over the --space file's distributions (tunelab/"
                                   "search.py says the format). Every trial is a run in OUT/trials/; poor trials "
                                   "are pruned at their dev evaluations. Rerun the same command to continue a "
                                   "stopped search; start it on other machines with the same --storage URL to "
                                   "add workers. At the end: best.yaml, search.md/json, history.png, "
                                   "parallel.png in OUT.")
    h.add_argument("recipe", help="recipe YAML file")
    h.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides every trial takes")
    h.add_argument("--space", required=True, help="search-space YAML: config key -> {type, low, high, ...}")
    h.add_argument("--trials", type=int, required=True, help="finished (complete or pruned) trials to reach")
    h.add_argument("--out", help="the search folder (default: the recipe's output_dir)")
    h.add_argument("--storage", help="an Optuna RDB URL shared by workers, e.g. postgresql://user@host/db "
                                     "(default: sqlite in the search folder)")
    h.add_argument("--study", default="tunelab", help="the study's name in the storage (default: %(default)s)")
    h.add_argument("--sampler", default="tpe", choices=["tpe", "random", "grid"])
    h.add_argument("--pruner", default="median", choices=["median", "hyperband", "asha", "none"])
    h.add_argument("--seed", type=int, default=0, help="the sampler's seed (the runs keep train.seed)")
    h.add_argument("--timeout", type=float, metavar="MINUTES", help="start no trial after this many minutes")
    h.add_argument("--max-steps", type=int, help="each trial's step budget (train.max_steps)")
    h.add_argument("--threads", type=int, help="torch threads per trial (default: the cores / --workers)")
    h.add_argument("--workers", type=int, default=1, help="trials run at once on this machine, each in its own "
                                                         "process (default: %(default)s)")
    h.add_argument("--rerun-top", type=int, default=0, metavar="K",
                   help="train the K best configurations again with --rerun-seeds; choose the best mean")
    h.add_argument("--rerun-seeds", default="", metavar="S,S,...", help="seeds for --rerun-top (e.g. 1,2,3)")
    h.add_argument("--no-finish", action="store_true", help=argparse.SUPPRESS)  # a --workers child
    return p


def _quantize_options(p, what: str) -> None:
    from tunelab.quantize import KINDS, MIN_AGREEMENT

    p.add_argument("--quantize", choices=KINDS, help=f"{what} int8: Linear weights in int8, activations quantised "
                                                     "per batch (CPU; NER, classification, relations; on a MiniLM "
                                                     "about 1.7x float32's speed on batches of whole sentences, "
                                                     "none on one-sentence requests), after checking that its "
                                                     "predictions agree with the float model's")
    p.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                   help="--quantize: the least share of predictions (tokens or texts) on the check inputs on "
                        "which the int8 and float models must agree (default: %(default)s)")


def _file_options(p) -> None:
    from tunelab.data import stream, tags  # their lists of input formats and tag schemes are the choices

    p.add_argument("--format", choices=stream.FORMATS, help="input format (default: from the extension)")
    p.add_argument("--text-field", default="text")
    p.add_argument("--label-field", default="label")
    p.add_argument("--text-pair-field", help="text pairs: the field of the second text (default: text_pair, for a "
                                              "model trained on pairs)")
    p.add_argument("--tokens-field", default="tokens")
    p.add_argument("--tags-field", default="tags")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--target-field", default="target")
    p.add_argument("--tag-column", type=int, default=-1)
    p.add_argument("--tag-scheme", default="iob2", choices=tags.SCHEMES)
    p.add_argument("--template", help="zero-shot prompting of an untuned causal LM (MODEL_DIR: a folder or packaged "
                                      "name, e.g. SmolLM2-135M-Instruct): the prompt, with {text} (and "
                                      "{text_pair}) to fill in; needs --labels")
    p.add_argument("--labels", metavar="LABEL[=WORD|WORD...],...",
                   help="--template: the labels and the words that say each (e.g. pos=great|good,neg=bad); a label "
                        "without words is said by its own name")
    p.add_argument("--calibrate", action="store_true", help="--template: contextual calibration against "
                                                             "content-free inputs (N/A, '', [MASK])")
    p.add_argument("--chat", action="store_true", help="--template: ask in the tokenizer's chat template")
    p.add_argument("--max-length", type=int, default=512, help="--template: tokens per prompt (default: "
                                                               "%(default)s)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast, as the recipes train and evaluate (faster "
                                                        "on CPUs with bf16 instructions)")
    _quantize_options(p, "run the model")


def _predictor(args):
    """The model folder's Predictor, or with --template an untuned causal LM asked zero-shot."""
    from tunelab.predict import Predictor

    if args.labels and not args.template:
        raise TunelabError("--labels goes with --template (zero-shot prompting); a trained folder has its labels")
    if not args.template:
        return Predictor(args.model_dir, args.device, args.batch_size, args.bf16, quantize=args.quantize,
                         min_agreement=args.min_agreement)
    if args.quantize:
        raise TunelabError("--quantize covers trained encoder models, not zero-shot prompting (--template)")
    from tunelab.tasks.prompt import zero_shot_meta

    if not args.labels:
        raise TunelabError("--template needs --labels (e.g. --labels positive=great|good,negative=bad)")
    meta = zero_shot_meta(args.template, args.labels, args.max_length, pairs=bool(args.text_pair_field),
                          calibrate=args.calibrate, chat=args.chat)
    return Predictor(args.model_dir, args.device, args.batch_size, args.bf16, meta=meta)


def _pair_field(args, task) -> str | None:
    """The field of the second text: --text-pair-field, else "text_pair" for a model of text pairs."""
    if args.text_pair_field and not getattr(task, "pairs", False):
        raise TunelabError(f"--text-pair-field: this model reads single texts ({task.kind}), not pairs")
    return args.text_pair_field or ("text_pair" if getattr(task, "pairs", False) else None)


def _read_labelled(args, task, path: str) -> list:
    from tunelab.data import read_file

    if args.format == "text":
        raise TunelabError(f"--format text: {path} must hold labels to evaluate on; use conll, jsonl or csv")
    return read_file(path, task.kind, args.format, True, text_field=args.text_field, label_field=args.label_field,
                     tokens_field=args.tokens_field, tags_field=args.tags_field, tag_column=args.tag_column,
                     tag_scheme=args.tag_scheme, prompt_field=args.prompt_field, target_field=args.target_field,
                     text_pair_field=_pair_field(args, task))


def cmd_train(args) -> int:
    from tunelab.config import load_config
    from tunelab.distributed import is_main
    from tunelab.report import metrics_table
    from tunelab.train import train

    cfg = load_config(args.recipe, args.overrides)
    if cfg.task == "multitask":
        from tunelab.multitask import train as train_multitask

        report = train_multitask(cfg, resume=args.resume, overwrite=args.overwrite)
        if not is_main():  # a distributed run: the main process prints
            return 0
        for name, entry in report["tasks"].items():
            if entry.get("test"):
                print(f"\n== {name}: test ==\n{metrics_table(entry['test'])}")
        print(f"\nmodel, report and curves: {cfg.output_dir}")
        return 0
    if cfg.task == "continual":
        from tunelab.continual import train as train_continual
        from tunelab.report.continual import matrix_markdown

        report = train_continual(cfg, resume=args.resume, overwrite=args.overwrite)
        print("\n" + matrix_markdown(report))
        print(f"\nmodel after each experience, report and matrix: {cfg.output_dir}")
        return 0
    if cfg.task == "rl":
        from tunelab.report.rl import before_after_table
        from tunelab.rl import train as train_rl

        report = train_rl(cfg, resume=args.resume, overwrite=args.overwrite)
        print(f"\n== held-out, before and after ==\n{before_after_table(report['before'], report['after'])}")
        print(f"\nmodel, report and curves: {cfg.output_dir}")
        return 0
    report = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if not is_main():
        return 0
    for split in ("dev", "test"):
        if report.get(split):
            print(f"\n== {split} ==\n{metrics_table(report[split])}")
    print(f"\nmodel, report and curves: {cfg.output_dir}")
    return 0


def cmd_pretrain(args) -> int:
    from tunelab.config import load_config
    from tunelab.data.packaged import BUILTIN
    from tunelab.distributed import is_main
    from tunelab.report import metrics_table
    from tunelab.train import train

    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        recipe, overrides = None, [recipe] + overrides  # (no recipe: the first word is an override)
    flags = [f"model.name={args.model}"] if args.model else []
    if args.text:
        flags.append(f"data.dataset={args.text}" if args.text in BUILTIN else f"data.train={args.text}")
    flags += ([f"data.dev={args.dev}"] if args.dev else []) + ([f"output_dir={args.output}"] if args.output else [])
    cfg = load_config(recipe, flags + overrides, base=None if recipe else {"task": "pretrain"})
    if cfg.task != "pretrain":
        raise TunelabError(f"{recipe}: a task: {cfg.task} recipe; `tunelab pretrain` runs task: pretrain (use "
                           "`tunelab train` for this one)")
    report = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if is_main():
        if report.get("dev"):
            print(f"\n== dev ==\n{metrics_table(report['dev'])}")
        backbone = f"{cfg.output_dir}/merged" if cfg.tune.merge else cfg.output_dir  # (an adapter: merged there)
        print(f"\ncontinued model: {cfg.output_dir} (fine-tune it with model.name={backbone})")
    return 0


def cmd_eval(args) -> int:
    from tunelab.data import check_known_labels, load_builtin
    from tunelab.io import atomic_write_json
    from tunelab.report import metrics_table

    if not args.perturb and (args.plot or args.report):
        raise TunelabError("--plot and --report show a robustness evaluation: add --perturb OP=P,... (e.g. "
                           "--perturb char_noise=0.05)")
    spec = _perturb_spec(args) if args.perturb else None  # a mistake in it stops the run before any work
    pred = _predictor(args)
    task = pred.task_for(task=args.task)
    name, _, split = args.data.partition(":")
    if not Path(args.data).exists() and (split or name in _builtin_names()):
        splits = load_builtin(name)
        split = split or "test"
        if split not in ("train", "dev", "test"):
            raise TunelabError(f"--data {args.data}: split must be train, dev or test")
        examples = getattr(splits, split)
    else:
        examples = _read_labelled(args, task, args.data)
    # A label the model never learned cannot be predicted: say so instead of scoring it as a silent miss.
    check_known_labels(examples, task.labels, "is not one the model was trained on")
    unreadable = pred.unreadable(examples, task=args.task)
    if unreadable:
        print(f"tunelab: warning: {args.data}: {unreadable}", file=sys.stderr)
    # Predictions are made once: the metrics of NER and classification are computed from them.
    predictions = pred.predict(examples, desc="predict", task=args.task) if args.predictions else None
    metrics = pred.evaluate(examples, desc="eval", task=args.task, predictions=predictions)
    print(metrics_table(metrics))
    doc = metrics
    if spec:
        doc = _robustness(args, spec, pred, task, examples, metrics)
    if args.output:
        atomic_write_json(args.output, doc)
    if args.predictions:
        write_predictions(args.predictions, task, examples, predictions)
    return 0


def _perturb_spec(args) -> dict[str, float]:
    """--perturb char_noise=0.05,mentions=0.2 -> {"char_noise": 0.05, "mentions": 0.2}; it and the other
    --perturb options checked."""
    from tunelab.config import AUGMENTATIONS

    if args.plot and not args.plot.lower().endswith(".png"):
        raise TunelabError(f"--plot {args.plot}: the chart is written as PNG; name a .png file")
    if args.report and not args.report.lower().endswith(".md"):
        raise TunelabError(f"--report {args.report}: the report is written as Markdown; name a .md file")
    if not 0 < args.perturb_intensity <= 1:
        raise TunelabError(f"--perturb-intensity {args.perturb_intensity}: must be in (0, 1]")
    spec = {}
    for part in filter(None, (p.strip() for p in args.perturb.split(","))):
        name, sep, value = part.partition("=")
        try:
            p = float(value)
        except ValueError:
            p = None
        if not sep or name not in AUGMENTATIONS or p is None or not 0 < p <= 1:
            raise TunelabError(f"--perturb {part!r}: write OP=P with OP one of {', '.join(AUGMENTATIONS)} and P a "
                               "probability in (0, 1]")
        spec[name] = p
    if not spec:
        raise TunelabError("--perturb: name at least one operation, e.g. --perturb char_noise=0.05")
    return spec


def _robustness(args, spec: dict, pred, task, examples, clean: dict) -> dict:
    """Score a seeded perturbed copy of `examples` beside the clean score: printed, returned for -o, plotted."""
    from tunelab.report import metrics_table, plot_robustness
    from tunelab.robust import augment_ops
    from tunelab.robust.augment import augment_all

    ops = augment_ops(spec, args.perturb_intensity, examples, task, pred.use(task=args.task)[1], "--perturb")
    perturbed = augment_all(examples, ops, args.perturb_seed, 0)
    metrics = pred.evaluate(perturbed, desc="eval perturbed", task=args.task)
    drop = clean["main"] - metrics["main"]
    print(f"\n== perturbed ({args.perturb}, intensity {args.perturb_intensity}, seed {args.perturb_seed}) ==\n"
          f"{metrics_table(metrics)}\n\n{task.main_name}: clean {task.format_main(clean)}, perturbed "
          f"{task.format_main(metrics)}; main score drops by {drop:.4f}")
    if args.plot:
        plot_robustness(args.plot, clean, metrics, f"{task.main_name}: clean vs perturbed ({args.perturb})")
    doc = {"clean": clean, "perturbed": metrics, "drop": drop,
           "perturb": {"operations": spec, "intensity": args.perturb_intensity, "seed": args.perturb_seed}}
    if args.report:
        import os

        from tunelab.io import atomic_write_text
        from tunelab.report import robustness_markdown

        plot = os.path.relpath(args.plot, Path(args.report).resolve().parent) if args.plot else None
        atomic_write_text(args.report, robustness_markdown(doc, task.main_name, args.data, plot))
    return doc


def cmd_search(args) -> int:
    import os
    import subprocess

    from tunelab import search
    from tunelab.config import load_config

    if args.trials < 1 or args.workers < 1 or (args.threads is not None and args.threads < 1):
        raise TunelabError("--trials, --workers and --threads must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        raise TunelabError("--max-steps must be at least 1")
    try:
        seeds = tuple(int(s) for s in args.rerun_seeds.split(",") if s.strip())
    except ValueError:
        raise TunelabError(f"--rerun-seeds {args.rerun_seeds!r}: write seeds as 1,2,3") from None
    if args.rerun_top and not seeds:
        raise TunelabError("--rerun-top needs --rerun-seeds (e.g. --rerun-seeds 1,2,3)")
    out = Path(args.out or load_config(args.recipe, args.overrides).output_dir)
    threads = args.threads or (max(1, (os.cpu_count() or 1) // args.workers) if args.workers > 1 else None)
    opts = search.Options(trials=args.trials, out=out, storage=args.storage, study=args.study,
                          sampler=args.sampler, pruner=args.pruner, seed=args.seed, timeout_minutes=args.timeout,
                          max_steps=args.max_steps, threads=threads, rerun_top=args.rerun_top, rerun_seeds=seeds)
    if args.workers > 1:
        # One process per worker, all on the same study; this one finishes when they are done.
        search.check_recipe(args.recipe, args.overrides)
        search.load_space(args.space, args.recipe, args.overrides)
        argv = [sys.executable, "-m", "tunelab", "search", args.recipe, *args.overrides, "--space", args.space,
                "--trials", str(args.trials), "--out", str(out), "--study", args.study, "--sampler", args.sampler,
                "--pruner", args.pruner, "--seed", str(args.seed), "--threads", str(threads), "--no-finish"]
        argv += (["--storage", args.storage] if args.storage else []) + \
            (["--timeout", str(args.timeout)] if args.timeout else []) + \
            (["--max-steps", str(args.max_steps)] if args.max_steps else [])
        out.mkdir(parents=True, exist_ok=True)
        children = [subprocess.Popen(argv) for _ in range(args.workers)]
        codes = [c.wait() for c in children]
        if any(codes):
            raise TunelabError(f"a search worker stopped with exit code {max(codes)}; rerun the command to continue")
    opts.finish = not args.no_finish
    search.search(args.recipe, args.space, opts, args.overrides, log=lambda m: print(f"[tunelab] {m}",
                                                                                     file=sys.stderr, flush=True))
    return 0


def _builtin_names():
    from tunelab.data.packaged import BUILTIN

    return BUILTIN


def cmd_predict(args) -> int:
    from tunelab.data import TextExample
    from tunelab.data.stream import input_format, stream_inputs
    from tunelab.predict_file import predict_file

    path = Path(args.input)
    if not path.is_file() and len(args.input) < 200 and " " not in args.input and \
            ("/" in args.input or path.suffix in (".txt", ".conll", ".jsonl", ".csv")):
        raise TunelabError(f"{args.input}: no such file (to predict on literal text, quote a sentence)")
    fmt = input_format(path, args.format) if path.is_file() else None  # (before the model loads: fail fast)
    pred = _predictor(args)
    task = pred.task_for(task=args.task)
    pair_field = _pair_field(args, task)

    def inputs():  # a fresh iterator on each call: predict_file reads the input twice (check, then predict)
        if not path.is_file():
            return [TextExample(args.input, None, "<argument>", None)]
        return stream_inputs(path, task.kind, fmt, text_field=args.text_field, tokens_field=args.tokens_field,
                             prompt_field=args.prompt_field, text_pair_field=pair_field)

    predict_file(pred, inputs, args.output, task=args.task, on_error=args.on_error, chunk_size=args.chunk_size,
                 max_new_tokens=args.max_new_tokens, source=str(path) if path.is_file() else None)
    return 0


def cmd_export(args) -> int:
    from tunelab.multitask.model import export
    from tunelab.train.run import read_meta

    if args.onnx:
        return _export_onnx(args)
    meta = read_meta(args.model_dir)
    if meta["task"] != "multitask":
        raise TunelabError(f"{args.model_dir}: not a multi-task folder; it is already a standalone "
                           f"{meta['task']} model (--onnx exports it as ONNX)")
    if args.task is None:
        raise TunelabError(f"{args.model_dir} holds tasks {', '.join(meta['tasks'])}: name one with --task")
    export(args.model_dir, meta, args.task, args.output)
    print(f"task {args.task} exported to {args.output} (loads with transformers "
          f"{meta['tasks'][args.task]['task']} Auto classes, and with tunelab predict/eval)")
    return 0


def _export_onnx(args) -> int:
    from tunelab.onnx_export import export_onnx

    texts = _check_texts(args.check_data) if args.check_data else None
    doc = export_onnx(args.model_dir, args.output, args.task, texts, args.atol, quantize=args.quantize,
                      min_agreement=args.min_agreement)
    p = doc["parity"]
    print(f"{doc['task']} model exported to {args.output}/model.onnx (opset {doc['opset']}); onnxruntime matches "
          f"torch on {p['features']} inputs: max |difference| {p['max_abs_diff']:.2g} <= {p['atol']:g}")
    if doc.get("quantized"):
        qd = doc["quantized"]
        print(f"int8: its predictions agree with the float model's on {qd['agreement']:.1%} of {qd['positions']} "
              f"positions (at least {qd['min_agreement']:.0%} required); {qd['bytes']:,} bytes, "
              f"{qd['float_bytes'] / qd['bytes']:.1f}x smaller than float32")
    return 0


def _check_texts(path, n: int = 32) -> list[str]:
    """The first `n` raw texts of a prediction input file (bad lines left out; CoNLL words joined)."""
    import itertools

    from tunelab.data import Sentence, TextExample
    from tunelab.data.stream import input_format, texts_of

    fmt = input_format(path, None, fix="name it .conll to check on the words of its first column, or give a file "
                                       "of text lines")
    good = (x for x in texts_of(path, fmt) if isinstance(x, (Sentence, TextExample)))
    texts = [" ".join(x.words) if isinstance(x, Sentence) else x.text for x in itertools.islice(good, n)]
    if not texts:
        raise TunelabError(f"--check-data {path}: no usable text in it")
    return texts


def cmd_serve(args) -> int:
    from tunelab.serve import Limits, ServeOptions, serve

    adapters = {}
    for spec in args.adapter:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise TunelabError(f"--adapter {spec}: write it as NAME=DIR")
        adapters[name] = folder
    limits = Limits(args.max_batch, args.max_wait_ms, args.queue_size, args.max_texts, args.max_chars,
                    args.max_body_bytes)
    serve(ServeOptions(args.model_dir, limits, args.device, args.threads, args.bf16, adapters, args.api_key_env,
                       args.api_key_file, args.quantize, args.min_agreement), args.host, args.port, args.workers,
          access_log=not args.no_access_log)
    return 0


def cmd_runs(args) -> int:
    from tunelab.runs import list_runs, markdown_table

    rows = list_runs(args.dir)
    if not rows:
        raise TunelabError(f"{args.dir}: no runs here (a run folder holds config.yaml with report.json or a "
                           "checkpoint)")
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows))
    return 0


def cmd_compare(args) -> int:
    from tunelab.runs import compare, markdown_table

    if args.out and not args.out.lower().endswith(".png"):
        raise TunelabError(f"--out {args.out}: the curves are written as PNG; name a .png file")
    rows = compare(args.runs, args.metrics, args.out)
    print(json.dumps(rows, indent=2) if args.json else markdown_table(rows))
    if args.out:
        print(f"curves: {args.out}", file=sys.stderr)
    return 0


def write_predictions(out, task, examples, predictions) -> None:
    """tunelab eval --predictions: JSONL records, or CoNLL columns (word gold predicted) where the task writes
    them (NER)."""
    from tunelab.io import atomic_write_text

    if out and str(out).endswith(".conll") and "conll" in task.outputs:
        atomic_write_text(out, task.conll(examples, predictions)[0])
        return
    lines = [json.dumps(r, ensure_ascii=False) for r in task.records(task.labels, examples, predictions)]
    if out:
        atomic_write_text(out, "\n".join(lines) + "\n")
    else:
        sys.stdout.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return {"train": cmd_train, "pretrain": cmd_pretrain, "eval": cmd_eval, "predict": cmd_predict,
                "export": cmd_export, "serve": cmd_serve, "runs": cmd_runs, "compare": cmd_compare,
                "search": cmd_search}[args.command](args)
    except TunelabError as e:
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = {"train": " (a training run continues with --resume)",
                "search": " (rerun the same command to continue the search)"}.get(args.command, "")
        print(f"tunelab: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
