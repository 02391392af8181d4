"""Reading task data: built-in sets, files (CoNLL, JSONL, CSV), in-memory lists and `datasets` objects."""

from tunelab.data.examples import GenExample, Sentence, TextExample
from tunelab.data.kinds import NOUNS, Fields, file_format, open_reader
from tunelab.data.packaged import Splits, load_builtin
from tunelab.data.readers import collect
from tunelab.errors import TunelabError

__all__ = ["Sentence", "TextExample", "GenExample", "Splits", "load_builtin", "read_file", "file_format", "load_splits",
           "from_records", "from_hf_dataset", "check_labels", "check_known_labels"]


def read_file(path, task: str, fmt: str | None = None, labelled: bool = True, *, text_field="text",
              label_field="label", tokens_field="tokens", tags_field="tags", tag_column=-1, tag_scheme="iob2",
              prompt_field="prompt", target_field="target", text_pair_field=None) -> list:
    """Every example of a file for task kind `task` (ner -> Sentence, classify -> TextExample, generate ->
    GenExample), read at once; the first bad line is a TunelabError naming file:line. Which formats a kind
    reads, and with which reader: the task type's `reader` (tunelab.tasks)."""
    fmt = file_format(path, fmt)
    fields = Fields(text_field, label_field, tokens_field, tags_field, tag_column, tag_scheme, prompt_field,
                    target_field, text_pair_field)
    return collect(open_reader(path, task, fmt, labelled, fields), path, NOUNS.get(fmt, "examples"))


def load_splits(data, task: str) -> Splits:
    """Splits from a DataConfig: a built-in set, or train/dev/test files (dev and test optional)."""
    from tunelab.tasks import task_of, task_type

    if data.dataset:
        splits = load_builtin(data.dataset)
        if not splits.train:
            raise TunelabError(f"data.dataset={data.dataset} is a test set only; train on another set and evaluate "
                               f"on it with `tunelab eval MODEL --data {data.dataset}`")
        if not isinstance(splits.train[0], task_type(task).example_type):
            raise TunelabError(f"data.dataset={data.dataset} is {task_of(splits.train[0]).noun} set, but task={task}")
        pairs = getattr(splits.train[0], "text_pair", None) is not None
        if pairs != (data.text_pair_field is not None):
            raise TunelabError(f"data.dataset={data.dataset} is a set of " + (
                "text pairs: set data.text_pair_field=text_pair (the model then reads pairs)" if pairs else
                "single texts: leave data.text_pair_field unset"))
    else:
        kw = vars(Fields.of(data))
        splits = Splits(*(read_file(p, task, data.format, **kw) if p else [] for p in (data.train, data.dev, data.test)),
                        {"files": {"train": data.train, "dev": data.dev, "test": data.test}})
    if data.skip_train_examples:
        splits.train = splits.train[data.skip_train_examples:]
        if not splits.train:
            raise TunelabError(f"data.skip_train_examples={data.skip_train_examples} skips every training example")
    if data.max_train_examples:
        splits.train = splits.train[: data.max_train_examples]
    if data.per_label:
        from tunelab.data.splits import per_label

        splits.train = per_label(splits.train, data.per_label, data.sample_seed, task_type(task).gold)
    if data.only_labels:
        kind = task_type(task)
        kind.check_kept_labels(splits.train, data.only_labels)
        splits.train, splits.dev, splits.test = (kind.keep_labels(s, data.only_labels)
                                                 for s in (splits.train, splits.dev, splits.test))
        if not splits.train:
            raise TunelabError(f"data.only_labels={data.only_labels}: no training example is left")
    if data.max_eval_examples:
        splits.dev = splits.dev[: data.max_eval_examples]
    return splits


def check_labels(train: list, others: dict[str, list], start: list[str] | None = None) -> list[str]:
    """The label list from training data (the examples' task type says how: tunelab.tasks.Task.label_list);
    a dev/test label never seen in training is an error naming where. `start`: the labels of a trained head
    that training continues (a saved model folder): they keep their places, and the training data's new labels
    follow them (the head is widened), so old rows keep meaning the same labels."""
    from tunelab.tasks import task_of

    if not train:
        raise TunelabError("no training examples")
    labels = task_of(train[0]).label_list(train)
    if start:
        labels = list(start) + [label for label in labels if label not in start]
    for split, examples in others.items():
        check_known_labels(examples, labels, f"in the {split} split never occurs in training")
    return labels


def check_known_labels(examples: list, labels: list[str], problem: str) -> None:
    """Every gold label of `examples` is one of `labels`; otherwise an error naming file:line and `problem`."""
    from tunelab.tasks import task_of

    known = set(labels)
    for ex in examples:
        for t in task_of(ex).gold(ex):
            if t is not None and t not in known:
                raise TunelabError(f"{ex.source}:{ex.line}: label {t!r} {problem}; known labels: {', '.join(labels)}")


def from_records(records: list, task: str) -> list:
    """In-memory data: NER records {"tokens": [...], "tags": [...]} (or (tokens, tags) pairs), classification
    records {"text": ..., "label": ...} (with "text_pair" for pairs; or (text, label) pairs), generation records
    {"prompt": ..., "target": ...}, regression {"text", "score"}, multi-label {"text", "labels": [...]}, QA
    {"question", "context", "answers"}, relations {"text", "head", "tail", "label"} (each task type's
    from_record says); examples are kept as they are."""
    from tunelab.tasks import task_type

    kind = task_type(task)
    return [r if isinstance(r, kind.example_type) else kind.from_record(r, i) for i, r in enumerate(records)]


def from_hf_dataset(ds, task: str, tokens_field="tokens", tags_field="ner_tags", text_field="text",
                    label_field="label", prompt_field="prompt", target_field="target") -> list:
    """A Hugging Face `datasets.Dataset`; integer ClassLabel columns are turned into their names."""
    from tunelab.tasks import task_type

    fields = Fields(text_field=text_field, label_field=label_field, tokens_field=tokens_field,
                    tags_field=tags_field, prompt_field=prompt_field, target_field=target_field)
    return from_records(task_type(task).hf_records(ds, fields), task)
