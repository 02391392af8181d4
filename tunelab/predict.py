"""The one path from examples to predictions, shared by the training recipe's evaluation, `tunelab eval`,
`tunelab predict` and the server: encode -> length-sorted batches -> forward -> decode."""

import contextlib
import json
from pathlib import Path

import torch

from tunelab import progress
from tunelab.data.batching import collate, eval_batches
from tunelab.errors import TunelabError, where

META_FILE = "tunelab.json"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TunelabError(f"train.device={name}: CUDA is not available on this machine; use cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def eval_mode(model):
    """Dropout off for inference, and the model's previous mode back afterwards (dev evaluation runs in the
    middle of training)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def inference_batches(features: list[dict], batch_size: int, desc: str | None, dist=None):
    """(position, feature indices) of length-sorted batches, with a progress bar when `desc` is given.

    dist (tunelab.distributed.Dist): a distributed run's evaluation; this rank gets every world-th batch
    of the very batches one process would run (so its outputs are the same), to be gathered by position."""
    batches = list(enumerate(eval_batches([len(f["input_ids"]) for f in features], batch_size)))
    if dist is not None and dist.world > 1:
        batches = batches[dist.rank::dist.world]
    return progress.bar(iterable=batches, desc=desc, disable=desc is None, leave=False, unit="batch")


@torch.inference_mode()
def feature_logits(model, features: list[dict], pad_id: int, device, bf16=False, batch_size=64,
                   desc: str | None = None, dist=None) -> list:
    """Logits per feature, as float32 numpy: (seq, labels) trimmed to the feature's length, or (labels,).
    dist: computed across a distributed run's ranks and gathered, every feature's logits on every rank."""
    out = {}
    with eval_mode(model):
        for _, idx in inference_batches(features, batch_size, desc, dist):
            batch = collate([features[i] for i in idx], pad_id)
            with autocast(device, bf16):
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits
            logits = logits.float().cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = logits[row, : len(features[i]["input_ids"])] if logits.ndim == 3 else logits[row]
    if dist is not None:
        out = dist.gather(out)
    return [out[i] for i in range(len(features))]


def predict(task, model, examples: list, device, bf16=False, batch_size=64, desc=None,
            max_new_tokens: int | None = None, dist=None) -> list:
    """Per example: NER (tags, scores), classification (label, probabilities), generation: the output text
    (of at most `max_new_tokens` tokens; None: the task's own bound; only generation takes it)."""
    if task.kind == "generate":
        return task.generate(model, examples, device, bf16, min(batch_size, 16), desc, max_new_tokens)
    if max_new_tokens is not None:
        raise ValueError(f"max_new_tokens is for generation; this task is {task.kind}")
    features = task.encode(examples, training=False)
    logits = feature_logits(model, features, task.pad, device, bf16, batch_size, desc, dist)
    return task.decode(features, logits, len(examples))


def evaluate(task, model, examples: list, device, bf16=False, batch_size=64, desc=None, dist=None) -> dict:
    """Metrics against the examples' gold labels or references; `main` is what model selection maximises.
    dist: a distributed run's ranks share the forward passes; every rank gets the metrics of all examples."""
    if task.kind == "generate":
        return task.evaluate(model, examples, device, bf16, min(batch_size, 16), desc, dist)
    return task.metrics(examples, predict(task, model, examples, device, bf16, batch_size, desc, dist=dist))


def text_examples(kind: str, texts: list) -> tuple[list, list | None]:
    """Raw texts (TextExample, label None) as the examples of a task of kind `kind`, and for NER the
    character offsets: offsets[i] = (text, [(start, end) of each word]). A text is its own document, so
    unrelated texts never serve as each other's context."""
    from tunelab.data.examples import GenExample, Sentence
    from tunelab.tasks.ner import split_words

    if kind == "generate":
        return [GenExample(t.text, None, t.source, t.line) for t in texts], None
    if kind != "ner":
        return list(texts), None
    examples, offsets = [], []
    for t in texts:
        words, offs = split_words(t.text)
        if not words:
            raise TunelabError(f"{where(t.source, t.line)}: no words in this text")
        examples.append(Sentence(words, None, len(examples), t.source, t.line))
        offsets.append((t.text, offs))
    return examples, offsets


def prediction_records(kind: str, labels: list[str], examples: list, predictions: list, offsets=None):
    """One JSON-ready record per example, as `tunelab predict` writes them and the server returns them.

    NER: text (raw input only), tokens, tags and entities (type, score = mean word score, text, and character
    start/end into the raw text, or first/last word for pre-split input); classification: text, label,
    score and probabilities by label name; generation: prompt, output (and the reference when there is one)."""
    from tunelab.tasks.ner import entity_spans

    for i, (ex, p) in enumerate(zip(examples, predictions)):
        if kind == "generate":
            yield {"prompt": ex.prompt, "output": p} | ({"reference": ex.target} if ex.target is not None else {})
            continue
        if kind == "classify":
            label, probs = p
            yield {"text": ex.text, "label": label, "score": max(probs), "probabilities": dict(zip(labels, probs))}
            continue
        tags, scores = p
        ents = []
        for etype, s, e in entity_spans(tags):
            ent = {"type": etype, "score": sum(scores[s:e]) / (e - s)}
            if offsets is not None:
                text, offs = offsets[i]
                ent.update(text=text[offs[s][0]:offs[e - 1][1]], start=offs[s][0], end=offs[e - 1][1])
            else:
                ent.update(text=" ".join(ex.words[s:e]), first_word=s, last_word=e - 1)
            ents.append(ent)
        rec = {"text": offsets[i][0]} if offsets is not None else {}
        rec.update(tokens=ex.words, tags=tags, entities=ents)
        yield rec


def read_meta(folder: Path) -> dict:
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise TunelabError(f"{folder}: not a tunelab model folder (no {META_FILE}); train one with `tunelab train`")
    return json.loads(path.read_text(encoding="utf-8"))


class Predictor:
    """A saved tunelab model folder, ready to predict.

    An adapter folder (tune.method lora/ia3/prompt/prefix) loads its base model once; more adapters trained on
    the same base can be added with `add_adapter(name, folder)` and chosen per call with
    `predict(..., adapter=name)`, without reloading the base. Each adapter keeps its own head and labels.
    """

    def __init__(self, model_dir, device="auto", batch_size=64, bf16: bool = False):
        """`bf16`: run the model under bf16 autocast, as the shipped recipes train and evaluate (about twice
        the speed on CPUs with bf16 instructions; logits differ from float32 in the second or third digit)."""
        self.dir = Path(model_dir)
        self.meta = read_meta(self.dir)
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.adapters, self.active = {}, None
        if self.meta["task"] == "multitask":
            from tunelab.multitask.model import load

            # A multi-task folder: one backbone, a head (and maybe an adapter) per task, chosen per call.
            self.tasks = {n: self._task(self.dir, m) for n, m in self.meta["tasks"].items()}
            self.task = None
            self.model = load(self.dir, self.meta).to(self.device).eval()
            return
        self.tasks = {}
        self.task = self._task(self.dir, self.meta)
        self.model = self._load_model().to(self.device).eval()
        if self.meta.get("adapter"):
            self.adapters, self.active = {"default": (self.meta, self.task)}, "default"

    def task_meta(self, task: str | None = None) -> dict:
        """The folder's metadata for one task (task type, labels, ...): of task `task` in a multi-task
        folder, which must then be named."""
        if not self.tasks:
            if task is not None:
                raise TunelabError(f"{self.dir}: not a multi-task folder (it holds one {self.meta['task']} "
                                   "model); leave out the task name")
            return self.meta
        if task not in self.tasks:
            raise TunelabError(f"{self.dir} holds tasks {', '.join(self.tasks)}: name one with --task"
                               + (f" ({task!r} is not one of them)" if task is not None else ""))
        return self.meta["tasks"][task]

    @staticmethod
    def _task(folder, meta):
        from tunelab.models import load_tokenizer
        from tunelab.tasks import make_task

        return make_task(meta["task"], load_tokenizer(folder), meta["labels"], meta["max_length"],
                         meta.get("context_sentences", 0), **meta.get("generation", {}))

    def _load_model(self):
        from transformers import AutoConfig

        from tunelab.models import load_model, model_class, quiet_transformers, resolve_model_path

        quiet_transformers()
        if not self.meta.get("adapter"):
            cls = model_class(self.meta["task"], AutoConfig.from_pretrained(str(self.dir)))
            return cls.from_pretrained(str(self.dir), use_safetensors=True)
        from peft import PeftModel

        base = load_model(resolve_model_path(self.meta["base_model"]), self.meta["task"], self.meta["labels"])
        model = PeftModel.from_pretrained(base, str(self.dir), adapter_name="default")
        if self.meta["tune"] == "prompt" and self.meta["task"] == "ner":
            from tunelab.peft import shift_token_outputs

            shift_token_outputs(model, self.meta["virtual_tokens"])
        return model

    def add_adapter(self, name: str, folder) -> None:
        """Load another adapter trained on the same base model under `name`."""
        folder = Path(folder)
        meta = read_meta(folder)
        if not self.adapters or not meta.get("adapter"):
            raise TunelabError(f"{folder if self.adapters else self.dir}: not an adapter folder; only adapters "
                               "(tune.method lora, ia3) share one base model")
        if name in self.adapters:
            raise TunelabError(f"adapter name {name!r} is already loaded")
        first = self.meta
        for key in ("base_model", "task"):
            if meta[key] != first[key]:
                raise TunelabError(f"{folder}: {key} is {meta[key]!r}, but the loaded adapters have "
                                   f"{first[key]!r}; adapters switched on one model share both")
        if "prompt" in (meta["tune"], first["tune"]) or "prefix" in (meta["tune"], first["tune"]):
            raise TunelabError(f"{folder}: prompt and prefix tuning adapters cannot be switched on one model; "
                               "load them separately")
        with _head_sized_for(self.model, len(meta["labels"])):
            self.model.load_adapter(str(folder), adapter_name=name)
        self.model.to(self.device).eval()
        self.adapters[name] = (meta, self._task(folder, meta))

    def predict(self, examples: list, desc=None, adapter: str | None = None, task: str | None = None,
                max_new_tokens: int | None = None) -> list:
        t, model = self.use(adapter, task)
        return predict(t, model, examples, self.device, self.bf16, self.batch_size, desc, max_new_tokens)

    def evaluate(self, examples: list, desc=None, adapter: str | None = None, task: str | None = None) -> dict:
        t, model = self.use(adapter, task)
        return evaluate(t, model, examples, self.device, self.bf16, self.batch_size, desc)

    def metrics(self, examples: list, predictions: list, task: str | None = None) -> dict:
        """Metrics of predictions already made (NER, classification)."""
        return self.task_for(task=task).metrics(examples, predictions)

    def task_for(self, adapter: str | None = None, task: str | None = None):
        """The task object a call with these arguments uses: the multi-task folder's task `task`, or the
        adapter `adapter`'s (the default adapter when several are loaded and none is named)."""
        self.task_meta(task)
        if self.tasks:
            return self.tasks[task]
        if adapter is not None or len(self.adapters) > 1:
            name = adapter or "default"
            if name not in self.adapters:
                raise TunelabError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters)}")
            return self.adapters[name][1]
        return self.task

    def use(self, adapter: str | None = None, task: str | None = None):
        """(Task, model) for a call, with the model switched to that task's head or that adapter."""
        t = self.task_for(adapter, task)
        if self.tasks:
            return t, self.model.use(task)
        if adapter is not None or len(self.adapters) > 1:
            name = adapter or "default"
            if name != self.active:
                self.model.set_adapter(name)
                self.active = name
        return t, self.model


@contextlib.contextmanager
def _head_sized_for(model, n_labels: int):
    """peft copies the base head for each new adapter and then loads the adapter's trained head into the copy;
    an adapter with a different number of labels needs a copy of its own size."""
    from peft.utils import ModulesToSaveWrapper

    swapped = []
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper) and isinstance(module.original_module, torch.nn.Linear):
            orig = module.original_module
            if orig.out_features != n_labels:
                module.original_module = torch.nn.Linear(orig.in_features, n_labels, orig.bias is not None,
                                                         device=orig.weight.device, dtype=orig.weight.dtype)
                swapped.append((module, orig))
    try:
        yield
    finally:
        for module, orig in swapped:
            module.original_module = orig
