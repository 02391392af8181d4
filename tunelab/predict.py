"""A saved tunelab model folder, ready to predict: `Predictor` loads it (single-task, adapter or multi-task),
picks the task (and adapter) a call asks for, and hands the examples to that task's own predict/evaluate
(tunelab.tasks). `tunelab eval`, `tunelab predict`, the server and the RL classifier reward all go
through it, so text -> output is one path.

The module-level functions below are the task-level calls under the names tunelab has always offered them.
"""

import contextlib
from pathlib import Path

import torch

from tunelab.errors import TunelabError
from tunelab.inference import feature_logits, inference_batches  # noqa: F401 (public names)
from tunelab.quantize import MIN_AGREEMENT
from tunelab.runtime import autocast, eval_mode, pick_device  # noqa: F401 (public names)
from tunelab.train.run import META_FILE, read_meta  # noqa: F401 (public names)


def predict(task, model, examples: list, device, bf16=False, batch_size=64, desc=None,
            max_new_tokens: int | None = None, dist=None) -> list:
    """Per example: NER (tags, scores), classification (label, probabilities), generation: the output text."""
    return task.predict(model, examples, device, bf16, batch_size, desc, max_new_tokens, dist)


def evaluate(task, model, examples: list, device, bf16=False, batch_size=64, desc=None, dist=None) -> dict:
    """Metrics against the examples' gold labels or references; `main` is what model selection maximises."""
    return task.evaluate(model, examples, device, bf16, batch_size, desc, dist)


def text_examples(kind: str, texts: list) -> tuple[list, list | None]:
    """Raw texts (TextExample) as the examples of a task of kind `kind` (tunelab.tasks.Task.text_examples)."""
    from tunelab.tasks import task_type

    return task_type(kind).text_examples(texts)


def prediction_records(kind: str, labels: list[str], examples: list, predictions: list, offsets=None):
    """One JSON-ready record per example (tunelab.tasks.Task.records)."""
    from tunelab.tasks import task_type

    return task_type(kind).records(labels, examples, predictions, offsets)


class Predictor:
    """A saved tunelab model folder, ready to predict.

    An adapter folder (tune.method lora/ia3/prompt/prefix) loads its base model once; more adapters trained on
    the same base can be added with `add_adapter(name, folder)` and chosen per call with
    `predict(..., adapter=name)`, without reloading the base. Each adapter keeps its own head and labels.
    """

    def __init__(self, model_dir, device="auto", batch_size=64, bf16: bool = False, meta: dict | None = None,
                 quantize: str | None = None, min_agreement: float | None = None):
        """`bf16`: run the model under bf16 autocast, as the shipped recipes train and evaluate (about twice
        the speed on CPUs with bf16 instructions; logits differ from float32 in the second or third digit).
        `meta`: the task to use the model for, in place of a tunelab.json (an untuned model asked zero-shot:
        tunelab.tasks.prompt.zero_shot_meta); model_dir may then also be a packaged model's name.
        `quantize`: "int8" runs the model dynamically quantised (tunelab.quantize), once it has passed the
        agreement check against the float model (at least `min_agreement` of the predictions the same)."""
        from tunelab.models import require_weights, resolve_model_path

        self.dir = resolve_model_path(str(model_dir)) if meta is not None else Path(model_dir)
        self.meta = meta if meta is not None else read_meta(self.dir)
        require_weights(self.dir, adapter=bool(self.meta.get("adapter")))
        self.device = pick_device(device)
        self.batch_size = batch_size
        self.bf16 = bf16
        self.adapters, self.active = {}, None
        self.quantized = None  # the agreement check's figures, per task, when quantised
        if self.meta["task"] == "multitask":
            from tunelab.multitask.model import load

            # A multi-task folder: one backbone, a head (and maybe an adapter) per task, chosen per call.
            self.tasks = {n: self._task(self.dir, m) for n, m in self.meta["tasks"].items()}
            self.task = None
            self.model = load(self.dir, self.meta).to(self.device).eval()
        else:
            self.tasks = {}
            self.task = self._task(self.dir, self.meta)
            self.model = self._load_model().to(self.device).eval()
            if self.meta.get("adapter") and not quantize:
                self.adapters, self.active = {"default": (self.meta, self.task)}, "default"
        if quantize:
            self._quantize(quantize, MIN_AGREEMENT if min_agreement is None else min_agreement)

    def _quantize(self, kind: str, min_agreement: float) -> None:
        """The model replaced by its int8 version, after checking that both predict alike on the built-in
        check texts (every task of a multi-task folder)."""
        from tunelab import quantize as q

        q.check_kind(kind)
        if self.bf16:
            raise TunelabError("--quantize int8 and --bf16 do not go together: the int8 layers take float32 "
                               "inputs; choose one")
        tasks = self.tasks or {None: self.task}
        for t in tasks.values():
            q.refuse_unsupported(t, self.device)
        from tunelab.config import ADAPTERS

        if self.tasks and self.meta.get("tune") in ADAPTERS:
            raise TunelabError(f"{self.dir}: a multi-task folder with per-task {self.meta.get('tune')} adapters "
                               "cannot be quantised as one model; export a task (tunelab export --task NAME) and "
                               "quantise that")
        if self.meta.get("adapter"):
            if self.meta.get("tune") in ("prompt", "prefix"):
                raise TunelabError(f"{self.dir}: a {self.meta['tune']}-tuning adapter cannot be merged into the "
                                   "weights, so it cannot be quantised; train with tune.method lora, ia3 or full")
            self.model = self.model.merge_and_unload().eval()  # one plain model: its Linear layers quantise

        def logits(features_of):
            return {name: feature_logits(self.use(task=name)[1], features_of[name], t.pad, self.device,
                                         batch_size=self.batch_size) for name, t in tasks.items()}

        features = {name: q.check_features(t) for name, t in tasks.items()}
        reference = logits(features)
        self.model = q.int8_dynamic(self.model)
        got = logits(features)
        self.quantized = {name or self.meta["task"]: q.require_agreement(
            reference[name], got[name], features[name], min_agreement,
            f"{self.dir}" + (f" task {name}" if name else "")) for name in tasks}

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
        from tunelab.tasks import task_from_meta

        return task_from_meta(meta, load_tokenizer(folder))

    def _load_model(self):
        from transformers import AutoConfig

        from tunelab.models import load_model, quiet_transformers, resolve_model_path

        quiet_transformers()
        if not self.meta.get("adapter"):
            cls = self.task.model_class(AutoConfig.from_pretrained(str(self.dir)))
            model = cls.from_pretrained(str(self.dir), use_safetensors=True)
            if self.meta.get("options", {}).get("crf"):
                from tunelab.models import crf

                crf.load(model, self.dir, self.meta["labels"])
            return model
        from peft import PeftModel

        base = load_model(resolve_model_path(self.meta["base_model"]), self.meta["task"], self.meta["labels"])
        model = PeftModel.from_pretrained(base, str(self.dir), adapter_name="default")
        if self.meta["tune"] == "prompt" and self.task.token_level:
            from tunelab.peft import shift_token_outputs

            shift_token_outputs(model, self.meta["virtual_tokens"])
        return model

    def add_adapter(self, name: str, folder) -> None:
        """Load another adapter trained on the same base model under `name`."""
        from tunelab.models import require_weights

        folder = Path(folder)
        meta = read_meta(folder)
        if self.quantized:
            raise TunelabError(f"{folder}: adapters cannot be added to a quantised model (its adapter is merged "
                               "into int8 weights); leave out --quantize to switch adapters")
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
        require_weights(folder, adapter=True)
        with _head_sized_for(self.model, len(meta["labels"])):
            self.model.load_adapter(str(folder), adapter_name=name)
        self.model.to(self.device).eval()
        self.adapters[name] = (meta, self._task(folder, meta))

    def predict(self, examples: list, desc=None, adapter: str | None = None, task: str | None = None,
                max_new_tokens: int | None = None) -> list:
        t, model = self.use(adapter, task)
        return t.predict(model, examples, self.device, self.bf16, self.batch_size, desc, max_new_tokens)

    def evaluate(self, examples: list, desc=None, adapter: str | None = None, task: str | None = None,
                 predictions: list | None = None) -> dict:
        """Metrics on labelled examples; `predictions` already made by `predict` are scored as they are where
        the task's metrics come from predictions (NER, classification), instead of predicting again."""
        t, model = self.use(adapter, task)
        return t.evaluate(model, examples, self.device, self.bf16, self.batch_size, desc, predictions=predictions)

    def unreadable(self, examples: list, adapter: str | None = None, task: str | None = None) -> str | None:
        """A warning when this model's tokenizer reads much of the examples as [UNK] (text in a script its
        vocabulary lacks, as training would refuse): its predictions on them mean little. None otherwise."""
        from tunelab.models import UNK_WARNING, unk_share

        t = self.task_for(adapter, task)
        share = unk_share(t.encode(examples, training=False), t.tokenizer)
        if share <= UNK_WARNING:
            return None
        return (f"{share:.0%} of the input's tokens are {t.tokenizer.unk_token} for this model's tokenizer: it cannot "
                "read this text well, and its predictions on it mean little (use a model whose vocabulary covers "
                "the text's script)")

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
