"""Task types, and the one registry of them.

A task type knows everything about its kind of task that the rest of tunelab needs: which transformers model
class and peft task type carry it, which examples it reads, how it encodes them into features, decodes
model outputs into predictions, scores predictions (`main` is what model selection maximises), writes
prediction records for `tunelab predict` and the server, and what its report shows. Recipes, prediction,
serving and reports ask the task; they never branch on its name.

Adding a task type: write tasks/NEW.py with a class that satisfies `Task` below, add it to REGISTRY, and
give a recipe (or the supervised one) data for it (README: "Adding a task type").
"""

from typing import Iterator, Protocol

from tunelab.errors import TunelabError
from tunelab.tasks.classify import ClassifyTask
from tunelab.tasks.generate import GenerateTask
from tunelab.tasks.multilabel import MultiLabelTask
from tunelab.tasks.ner import NerTask
from tunelab.tasks.pretrain import PretrainTask
from tunelab.tasks.prompt import PromptTask
from tunelab.tasks.qa import QATask
from tunelab.tasks.regress import RegressTask
from tunelab.tasks.relation import RelationTask


class Task(Protocol):
    # -- what the kind is (class attributes; no tokenizer needed) --
    kind: str  # the registry name, `task:` in a recipe
    # Sentence | TextExample | GenExample | ... (tunelab.data.examples): one type per task type, except that
    # prompting reads classification's examples (task_of names classify for them)
    example_type: type
    head: str  # the head transformers must have for the backbone, in words ("token-classification")
    new_head: bool  # a freshly initialised head that always trains (classification), or a pretrained one
    predicts: bool  # it makes predictions (predict, serve, export); a pre-training folder is a backbone: no
    token_level: bool  # one output row per input token (prompt tuning must shift them past its tokens)
    tag_sequences: bool  # a tag per word (NER): a CRF (model.crf) can score and decode the sequence
    outputs: tuple  # prediction file formats besides JSONL records ("conll")
    ranks_labels: bool  # one probability per label: requests may ask for the top k
    decoder_only: bool  # on a shared multi-task backbone, only a causal LM's will do
    donor_rank: int  # multi-task: the task model with the lowest rank lends its backbone to the others
    main_name: str  # what metrics["main"] is, in reports
    score_name: str  # what score(metrics) is: a 0-1 value multi-task selection averages
    curve_title: str
    noun: str  # the kind in a sentence: "an NER" (set)

    @staticmethod
    def reader(path, fmt: str, labelled: bool, fields) -> Iterator:
        """The examples of a file of format `fmt` (and BadLines for bad ones), read lazily with the field names
        in `fields` (tunelab.data.kinds.Fields); a format this task cannot read raises TunelabError."""

    @staticmethod
    def from_record(record, i: int):
        """An in-memory record (dict or tuple) as an example; `i` names it in errors."""

    @staticmethod
    def hf_records(ds, fields) -> list[dict]:
        """A Hugging Face dataset's rows as records for from_record."""

    @staticmethod
    def label_list(train: list) -> list[str]:
        """The label set training examples define (empty for generation)."""

    @staticmethod
    def gold(example) -> list:
        """An example's gold labels, to check against a label list."""

    @staticmethod
    def check_kept_labels(train: list, keep: list[str]) -> None:
        """data.only_labels: raise TunelabError naming any kept label the training data does not have."""

    @staticmethod
    def keep_labels(examples: list, keep: list[str]) -> list:
        """The examples as data annotated for the `keep` labels only would be (data.only_labels)."""

    @staticmethod
    def merge_predictions(examples: list, predictions: list) -> list:
        """Examples whose unannotated parts take another model's predictions (continual pseudo-labels)."""

    @staticmethod
    def restrict_predictions(predictions: list, labels: list[str]) -> list:
        """Predictions scored against data of `labels` only (continual learning's per-experience scores)."""

    @staticmethod
    def objective(forward):
        """The forward pass training differentiates, built on the model's `forward`: the model's own (its loss
        from the batch's labels: most task types, tasks.common.model_loss), or one that forms the task's loss
        from the model's outputs (prompting: the cross-entropy of the label words' scores). It returns an output
        with .loss and .logits, as a transformers model does."""

    @staticmethod
    def model_class(config):
        """The transformers Auto class for a backbone with this config."""

    @staticmethod
    def peft_type(config):
        """peft.TaskType for adapters on such a model."""

    @staticmethod
    def configure(config, labels: list[str]) -> None:
        """Set the model config's head size and id2label (in place)."""

    @staticmethod
    def options(data, model_config) -> dict:
        """The task's settings from the data config section and the model config (build's `options`)."""

    @classmethod
    def build(cls, tokenizer, labels: list[str], max_length: int, options: dict) -> "Task": ...

    @staticmethod
    def text_examples(texts: list) -> tuple[list, list | None]:
        """Raw texts (TextExample) as this task's examples, with character offsets where records need them."""

    @staticmethod
    def records(labels: list[str], examples: list, predictions: list, offsets=None) -> Iterator[dict]:
        """One JSON-ready record per example, as `tunelab predict` writes them and the server returns them."""

    @staticmethod
    def format_main(metrics: dict) -> str: ...

    @staticmethod
    def score(metrics: dict) -> float: ...

    @staticmethod
    def curve_value(main: float) -> float:
        """The dev value as the report's curve shows it (generation: the loss rather than -loss)."""

    # -- one task with its tokenizer and labels (instances) --
    labels: list[str]
    pad: int  # the input id that pads a batch (collate)
    max_length: int
    new_tokens_bound: int | None  # generation: the most new tokens a prediction may ask for; else None

    def encode(self, examples: list, training: bool) -> list[dict]:
        """Features: dicts with input_ids (list[int]), labels (list[int] or int), example (int)."""

    def predict(self, model, examples: list, device, bf16=False, batch_size=64, desc=None, max_new_tokens=None,
                dist=None) -> list:
        """Per example: NER (tags, scores), classification and relations (label, probabilities), multi-label
        (labels, probabilities), regression a value, QA (answer, start, end, score), generation output text."""

    def evaluate(self, model, examples: list, device, bf16=False, batch_size=64, desc=None, dist=None,
                 predictions=None) -> dict:
        """Metrics with `main` (higher is better). `predictions`: already made ones, where metrics come from
        predictions (not recomputed). dist: a distributed run's ranks share the work, all get the metrics."""

    def meta(self) -> dict:
        """What a saved folder's tunelab.json keeps to rebuild this task (build_from_meta)."""

    def describe(self) -> dict:
        """What the HTTP API says about this task."""

    def epoch_features(self, features: list[dict], seed: int, epoch: int) -> list[dict]:
        """The training features of one epoch from the encoded ones, a pure function of its arguments (a resumed
        run sees the same): the same every epoch (most task types), or drawn anew (masked language modelling
        masks each epoch anew)."""

    def settle(self, dev_metrics: dict) -> None:
        """After model selection: take decision settings from the selected dev evaluation's metrics before the
        test split is scored and the model saved (multi-label: the threshold). Most task types have none."""

    def samples(self, model, examples: list, device, bf16) -> list[dict] | None:
        """Sample outputs for the report, or None."""


REGISTRY: dict[str, type] = {t.kind: t for t in (NerTask, ClassifyTask, GenerateTask, RegressTask, MultiLabelTask,
                                               QATask, RelationTask, PromptTask, PretrainTask)}
KINDS = tuple(REGISTRY)


def task_type(kind: str):
    """The task class registered as `kind`."""
    if kind not in REGISTRY:
        raise TunelabError(f"unknown task {kind!r}; one of {', '.join(REGISTRY)}")
    return REGISTRY[kind]


def task_of(example):
    """The task type whose examples are like `example` (a Sentence is NER's, ...)."""
    for t in REGISTRY.values():
        if isinstance(example, t.example_type):
            return t
    raise TypeError(f"no task type reads {type(example).__name__} examples")


def make_task(kind: str, tokenizer, labels, max_length: int, context_sentences: int = 0, **options):
    """A task of kind `kind` for this tokenizer and label list; `options` as the task type's options() gives
    them (context_sentences for NER; encoder_decoder, prompt_suffix, max_target_length for generation)."""
    return task_type(kind).build(tokenizer, labels, max_length, {"context_sentences": context_sentences, **options})


def task_from_meta(meta: dict, tokenizer):
    """The task a saved folder's tunelab.json (or one task's entry in a multi-task folder's) describes."""
    options = {"context_sentences": meta.get("context_sentences", 0), **meta.get("generation", {}),
               **meta.get("options", {})}
    return task_type(meta["task"]).build(tokenizer, meta["labels"], meta["max_length"], options)
