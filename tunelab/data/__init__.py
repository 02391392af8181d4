"""Reading task data: built-in sets, files (CoNLL, JSONL, CSV), in-memory lists and `datasets` objects."""

from tunelab.data.examples import GenExample, Sentence, TextExample
from tunelab.data.kinds import NOUNS, Fields, file_format, open_reader
from tunelab.data.packaged import Splits, load_builtin
from tunelab.data.readers import collect
from tunelab.data.tags import to_iob2
from tunelab.errors import TunelabError

__all__ = ["Sentence", "TextExample", "GenExample", "Splits", "load_builtin", "read_file", "file_format", "load_splits",
           "from_records", "from_hf_dataset", "check_labels", "check_known_labels"]


def read_file(path, task: str, fmt: str | None = None, labelled: bool = True, *, text_field="text",
              label_field="label", tokens_field="tokens", tags_field="tags", tag_column=-1, tag_scheme="iob2",
              prompt_field="prompt", target_field="target") -> list:
    """Every example of a file for task kind `task` (ner -> Sentence, classify -> TextExample, generate ->
    GenExample), read at once; the first bad line is a TunelabError naming file:line. Which formats a kind
    reads, and with which fields: tunelab.data.kinds."""
    fmt = file_format(path, fmt)
    fields = Fields(text_field, label_field, tokens_field, tags_field, tag_column, tag_scheme, prompt_field,
                    target_field)
    examples = collect(open_reader(path, task, fmt, labelled, fields), path, NOUNS.get(fmt, "examples"))
    if task == "generate":  # the readers' TextExample(text, label) holds the prompt and the target
        return [GenExample(e.text, e.label, e.source, e.line) for e in examples]
    return examples


def load_splits(data, task: str) -> Splits:
    """Splits from a DataConfig: a built-in set, or train/dev/test files (dev and test optional)."""
    if data.dataset:
        splits = load_builtin(data.dataset)
        kind = {"ner": Sentence, "classify": TextExample, "generate": GenExample}[task]
        if not isinstance(splits.train[0], kind):
            what = {Sentence: "an NER", TextExample: "a classification", GenExample: "a generation"}
            raise TunelabError(f"data.dataset={data.dataset} is {what[type(splits.train[0])]} set, but task={task}")
    else:
        kw = dict(text_field=data.text_field, label_field=data.label_field, tokens_field=data.tokens_field,
                  tags_field=data.tags_field, tag_column=data.tag_column, tag_scheme=data.tag_scheme,
                  prompt_field=data.prompt_field, target_field=data.target_field)
        splits = Splits(*(read_file(p, task, data.format, **kw) if p else [] for p in (data.train, data.dev, data.test)),
                        {"files": {"train": data.train, "dev": data.dev, "test": data.test}})
    if data.max_train_examples:
        splits.train = splits.train[: data.max_train_examples]
    if data.max_eval_examples:
        splits.dev = splits.dev[: data.max_eval_examples]
    return splits


def check_labels(train: list, others: dict[str, list]) -> list[str]:
    """The label list from training data; a dev/test label never seen in training is an error naming where."""
    from tunelab.data.tags import label_list

    if not train:
        raise TunelabError("no training examples")
    if isinstance(train[0], GenExample):
        return []  # generation has references, not labels
    if isinstance(train[0], Sentence):
        labels = label_list(s.tags for s in train)
    else:
        labels = sorted({e.label for e in train})
        if len(labels) < 2:
            raise TunelabError(f"training data has {len(labels)} distinct label(s); classification needs at least 2")
    for split, examples in others.items():
        check_known_labels(examples, labels, f"in the {split} split never occurs in training")
    return labels


def check_known_labels(examples: list, labels: list[str], problem: str) -> None:
    """Every gold label of `examples` is one of `labels`; otherwise an error naming file:line and `problem`."""
    known = set(labels)
    for ex in examples:
        if isinstance(ex, GenExample):
            continue
        for t in (ex.tags or []) if isinstance(ex, Sentence) else [ex.label]:
            if t is not None and t not in known:
                raise TunelabError(f"{ex.source}:{ex.line}: label {t!r} {problem}; known labels: {', '.join(labels)}")


def from_records(records: list, task: str) -> list:
    """In-memory data: NER records {"tokens": [...], "tags": [...]} (or (tokens, tags) pairs), classification
    records {"text": ..., "label": ...} (or (text, label) pairs), generation records {"prompt": ..., "target":
    ...} (or (prompt, target) pairs)."""
    out = []
    for i, r in enumerate(records):
        if isinstance(r, (Sentence, TextExample, GenExample)):
            out.append(r)
            continue
        if task == "generate":
            prompt, target = (r.get("prompt"), r.get("target")) if isinstance(r, dict) else r
            for name, value in (("prompt", prompt), ("target", target)):
                if (value is not None or name == "prompt") and (not isinstance(value, str) or not value.strip()):
                    raise TunelabError(f"record {i}: {name} must be a non-empty string")
            out.append(GenExample(prompt, target, "<memory>", i))
            continue
        if task == "ner":
            words, tags = (r.get("tokens"), r.get("tags")) if isinstance(r, dict) else r
            if not words or (tags is not None and len(tags) != len(words)):
                raise TunelabError(f"record {i}: needs non-empty tokens and one tag per token")
            if tags is not None:
                try:
                    tags = to_iob2([str(t) for t in tags], "iob2")
                except ValueError as e:
                    raise TunelabError(f"record {i}: {e}") from None
            out.append(Sentence(list(words), tags, i, "<memory>", i))
        else:
            text, label = (r.get("text"), r.get("label")) if isinstance(r, dict) else r
            if not isinstance(text, str) or not text.strip():
                raise TunelabError(f"record {i}: text must be a non-empty string")
            out.append(TextExample(text, None if label is None else str(label), "<memory>", i))
    return out


def from_hf_dataset(ds, task: str, tokens_field="tokens", tags_field="ner_tags", text_field="text",
                    label_field="label", prompt_field="prompt", target_field="target") -> list:
    """A Hugging Face `datasets.Dataset`; integer ClassLabel columns are turned into their names."""
    cols = ds.column_names
    if task == "generate":
        if prompt_field not in cols or target_field not in cols:
            raise TunelabError(f"dataset has columns {cols}; need {prompt_field!r} and {target_field!r}")
        recs = [{"prompt": r[prompt_field], "target": r[target_field]} for r in ds]
    elif task == "ner":
        if tokens_field not in cols or tags_field not in cols:
            raise TunelabError(f"dataset has columns {cols}; need {tokens_field!r} and {tags_field!r}")
        feat = ds.features[tags_field]
        names = getattr(getattr(feat, "feature", None), "names", None)
        recs = [{"tokens": r[tokens_field], "tags": [names[t] for t in r[tags_field]] if names else r[tags_field]}
                for r in ds]
    else:
        if text_field not in cols or label_field not in cols:
            raise TunelabError(f"dataset has columns {cols}; need {text_field!r} and {label_field!r}")
        names = getattr(ds.features[label_field], "names", None)
        recs = [{"text": r[text_field], "label": names[r[label_field]] if names else r[label_field]} for r in ds]
    return from_records(recs, task)
