"""Pieces several task types share: the tokenizer's special tokens and pad id, and prediction through
per-feature logits (encode -> batched forward -> decode) for the task types that classify.

Like every module of tunelab.tasks, this one loads without torch (the registry is what config validates
`task:` against); inference is imported where it runs."""


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a sequence ([CLS] / [SEP] for BERT, <s> / </s> ...)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def encode_texts(tokenizer, examples: list, max_length: int, pairs: bool) -> tuple[list[dict], int]:
    """Inputs of texts (or text pairs: `pairs`, from each example's `text_pair`) for a sequence-level head, and
    how many were longer than max_length. A single text over the limit keeps its beginning and the closing
    special token; a pair is cut as the tokenizer cuts pairs (longest_first: the longer text loses tokens
    first), and carries token_type_ids where the tokenizer's model takes them (BERT: 0 for the first text, 1
    for the second), as transformers' own pipeline feeds a pair."""
    check_pairs(examples, pairs)
    if not pairs:
        full = tokenizer([e.text for e in examples])["input_ids"]
        suffix = special_tokens(tokenizer)[1]
        keep = max_length - len(suffix)
        return ([{"input_ids": ids if len(ids) <= max_length else ids[:keep] + suffix} for ids in full],
                sum(len(ids) > max_length for ids in full))
    types = "token_type_ids" in tokenizer.model_input_names
    firsts, seconds = [e.text for e in examples], [e.text_pair for e in examples]
    full = tokenizer(firsts, seconds, return_token_type_ids=types)
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    if long:
        cut = tokenizer([firsts[i] for i in long], [seconds[i] for i in long], truncation="longest_first",
                        max_length=max_length, return_token_type_ids=types)
        for j, i in enumerate(long):
            for key in cut:
                full[key][i] = cut[key][j]
    keys = ("input_ids", "token_type_ids") if types else ("input_ids",)
    return [{k: full[k][i] for k in keys} for i in range(len(examples))], len(long)


def check_pairs(examples: list, pairs: bool) -> None:
    """Every example is a text pair (`pairs`) or every one a single text; else a TunelabError naming where."""
    from tunelab.errors import TunelabError

    for e in examples:
        if (e.text_pair is not None) != pairs:
            where = f"{e.source}:{e.line}" if e.line is not None else e.source
            raise TunelabError(f"{where}: " + (
                "this model reads text pairs; give the second text too (data.text_pair_field, or "
                "--text-pair-field / text_pairs in a request)" if pairs else
                "this model reads single texts, but the input has a second text (text_pair); leave it out"))


def pad_id(tokenizer, fallback: int = 0) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else fallback


def predict_by_logits(task, model, examples: list, device, bf16=False, batch_size=64, desc=None,
                      max_new_tokens=None, dist=None) -> list:
    """encode -> logits per feature -> the task's decode; one prediction per example."""
    from tunelab.inference import feature_logits

    if max_new_tokens is not None:
        raise ValueError(f"max_new_tokens is for generation; this task is {task.kind}")
    features = task.encode(examples, training=False)
    logits = feature_logits(model, features, task.pad, device, bf16, batch_size, desc, dist)
    return task.decode(features, logits, len(examples))


def evaluate_by_predictions(task, model, examples: list, device, bf16=False, batch_size=64, desc=None, dist=None,
                            predictions=None) -> dict:
    """Metrics of the task's predictions (made here by its own predict unless given) against the examples'
    gold labels."""
    if predictions is None:
        predictions = task.predict(model, examples, device, bf16, batch_size, desc, dist=dist)
    return task.metrics(examples, predictions)


# How the classifying tasks (NER, classification) show and score `main`: an F1 on a 0-1 scale.

def percent(m: dict) -> str:
    return f"{m['main'] * 100:.2f}"


def main_score(m: dict) -> float:
    return m["main"]


def as_is(main: float) -> float:
    return main


def no_samples(task, model, examples, device, bf16) -> None:
    """The report's sample outputs: none (the per-label tables say more)."""
    return None


def set_labels(config, labels: list[str]) -> None:
    """A classification head's size and label names (id2label is what plain transformers shows)."""
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: i for i, label in enumerate(labels)}


def text_reader(path, fmt: str, labelled: bool, text, label, free_text: bool, what: str, pair=None):
    """JSONL or CSV records with a text field (and a label, or free text for a generation target; and with
    `pair`, a second text) -> TextExample; unlabelled single texts also plain text lines. text/label/pair:
    tunelab.data.readers.Field."""
    from tunelab.data.readers import csv_texts, jsonl_texts, text_lines
    from tunelab.errors import TunelabError

    if fmt == "jsonl":
        return jsonl_texts(path, text, label, free_text, pair=pair)
    if fmt == "csv":
        return csv_texts(path, text, label, free_text, pair=pair)
    if fmt == "text" and pair is not None:
        raise TunelabError(f"{path}: a text pair model reads JSONL or CSV records with {text.name!r} and "
                           f"{pair.name!r} fields, not text lines")
    if fmt == "text" and not labelled:
        return text_lines(path)
    if labelled:
        raise TunelabError(f"{path}: {what} data must be JSONL or CSV with {text.name!r} and {label.name!r} fields")
    raise TunelabError(f"{path}: {what} input must be text lines, JSONL or CSV with a {text.name!r} field"
                       + ("; CoNLL columns are NER input" if fmt == "conll" else ""))


def pair_option(data, model_config) -> dict:
    """options() of the task types that read single texts or text pairs (data.text_pair_field)."""
    return {"pairs": data.text_pair_field is not None}


def record_texts(r, i: int) -> tuple[str, str | None]:
    """An in-memory record's text and text_pair (None when it has none): a dict, or a tuple starting with the
    text."""
    from tunelab.errors import TunelabError

    text, pair = (r.get("text"), r.get("text_pair")) if isinstance(r, dict) else (r[0], None)
    for name, value in (("text", text), ("text_pair", pair)):
        if (value is not None or name == "text") and (not isinstance(value, str) or not value.strip()):
            raise TunelabError(f"record {i}: {name} must be a non-empty string")
    return text, pair


def require_columns(ds, need: list[str]) -> None:
    """A Hugging Face dataset must have the columns a task reads (TunelabError naming them otherwise)."""
    from tunelab.errors import TunelabError

    missing = [c for c in need if c not in ds.column_names]
    if missing:
        raise TunelabError(f"dataset has columns {ds.column_names}; need {' and '.join(map(repr, need))}")


# Continual learning's data hooks (tunelab.tasks.Task), where task types share them.

def check_known(keep: list[str], known: list[str], what: str, hint: str = "") -> None:
    """data.only_labels: every kept name is one of the training data's `known` labels (or entity types)."""
    from tunelab.errors import TunelabError

    unknown = [k for k in keep if k not in known]
    if unknown:
        raise TunelabError(f"data.only_labels: {', '.join(map(repr, unknown))} not among the training data's "
                           f"{what} ({', '.join(known)}){hint}")


def nothing_to_fill(examples: list, predictions: list) -> list:
    """merge_predictions of a task whose examples leave no label out (one label, or a reference)."""
    from tunelab.errors import TunelabError

    raise TunelabError("continual.strategy=pseudo fills in the entity labels that an NER experience leaves out; "
                       "this task's examples have nothing to fill in")


def predictions_as_given(predictions: list, labels: list[str]) -> list:
    """restrict_predictions of a task whose predictions need no restricting: a text of these classes
    predicted as another is simply wrong (class-incremental scoring); a generated text has no labels."""
    return predictions


def model_loss(forward):
    """objective() of the task types whose model forms the loss itself from the batch's labels: the model's
    own forward, as it is."""
    return forward


def same_every_epoch(task, features: list, seed: int, epoch: int) -> list:
    """epoch_features() of the task types whose training features are the same every epoch."""
    return features


def no_decision_to_settle(task, dev_metrics: dict) -> None:
    """settle() of the task types whose decision rule has no setting to take from dev (argmax, spans)."""


# The task types whose head is transformers' sequence classifier (classification, pairs, regression,
# multi-label, relations): one model class and peft task type.

def masked_encoder(config) -> bool:
    """An encoder that transformers trains by masked language modelling (BERT-style), not a causal LM or an
    encoder-decoder: pre-training continues it with MLM; prompting (next words) cannot use it."""
    from transformers import MODEL_FOR_MASKED_LM_MAPPING

    return type(config) in MODEL_FOR_MASKED_LM_MAPPING and not config.is_decoder and not config.is_encoder_decoder


def sequence_classifier(config):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification


def sequence_classifier_peft(config):
    import peft

    return peft.TaskType.SEQ_CLS


# The task types whose data has no labels (generation: references; regression: scores; QA: answer spans).

def no_labels(train: list) -> list[str]:
    """label_list / gold of a task type without labels: none to collect or check."""
    return []


def all_examples(examples: list, keep: list[str]) -> list:
    """keep_labels of a task type without labels: every example stays."""
    return examples


def refuse_only_labels(what: str):
    """check_kept_labels of a task type without labels: data.only_labels is a mistake there."""
    def check_kept_labels(train: list, keep: list[str]) -> None:
        from tunelab.errors import TunelabError

        raise TunelabError(f"data.only_labels: {what}, not labels; leave it unset")
    return staticmethod(check_kept_labels)
