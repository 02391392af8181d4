"""Named-entity recognition as token classification.

Sub-word alignment: a word's label goes on its first sub-token; later sub-tokens, special tokens and context
words get -100 (no loss). Sentences longer than the model's limit are cut into windows at word boundaries,
never truncated: disjoint windows for training, overlapping ones for prediction, where each word is read
from the window in which it sits farthest from an edge.
"""

import re

import numpy as np

from tunelab.data.examples import Sentence
from tunelab.errors import TunelabError, where
from tunelab.tasks.common import (as_is, evaluate_by_predictions, main_score, no_decision_to_settle,
                                  no_samples, pad_id, percent, predict_by_logits, same_every_epoch, set_labels,
                                  special_tokens)

IGNORE = -100
__all__ = ["NerTask", "IGNORE", "special_tokens", "word_pieces", "windows", "viterbi", "split_words", "entity_spans"]


def word_pieces(tokenizer, sentences: list[list[str]]) -> list[list[list[int]]]:
    """Sub-token ids of every word, tokenised in one fast batch call. A word that yields no sub-token
    (a stray control character) becomes [UNK], so that every word can carry its label."""
    enc = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False)
    unk = [tokenizer.unk_token_id] if tokenizer.unk_token_id is not None else []
    marker = word_start_piece(tokenizer)
    out = []
    for i, words in enumerate(sentences):
        pieces = [[] for _ in words]
        for tok, w in zip(enc["input_ids"][i], enc.word_ids(i)):
            if w is not None:
                pieces[w].append(tok)
        if marker is not None:
            for w, p in enumerate(pieces):
                if len(p) > 1 and p[0] == marker and _CJK_WORD.fullmatch(words[w]):
                    del p[0]
        out.append([p if p else list(unk) for p in pieces])
    return out


def word_start_piece(tokenizer) -> int | None:
    """The id of a SentencePiece tokenizer's bare word-start piece ("▁"), or None.

    Such a tokenizer starts every word it is given with a space, and Chinese characters mostly lack a
    "▁X" piece, so character words would each cost two pieces, "▁" and the character, where running text
    has just the character (XLM-R reads 中国人 as one piece or three bare ones). word_pieces drops that
    bare marker before a word of Chinese characters, so a character sequence is read as it is written."""
    piece = tokenizer.convert_tokens_to_ids("\u2581")
    return piece if isinstance(piece, int) and piece != tokenizer.unk_token_id else None


def windows(counts: list[int], budget: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Cut a sequence of words (with sub-token `counts`) into windows of at most `budget` sub-tokens.

    Returns (start, end, core_start, core_end) word ranges; the cores partition the words. With
    `overlap` > 0 consecutive windows share about that many sub-tokens and the core boundary sits in the
    middle of the shared part. A single word longer than the budget gets a window of its own (its pieces
    are clipped by the caller).
    """
    n = len(counts)
    spans = []
    start = 0
    while True:
        end, used = start, 0
        while end < n and (used + counts[end] <= budget or end == start):
            used += counts[end]
            end += 1
        spans.append((start, end))
        if end >= n:
            break
        nxt = end
        shared = 0
        # (never so far back that the next window cannot reach past this one: that window would be redundant)
        while overlap and nxt - 1 > start and shared + counts[nxt - 1] <= min(overlap, budget - counts[end]):
            nxt -= 1
            shared += counts[nxt]
        start = nxt
    out = []
    for i, (s, e) in enumerate(spans):
        core_s = 0 if i == 0 else (s + spans[i - 1][1]) // 2
        core_e = n if i == len(spans) - 1 else (spans[i + 1][0] + e) // 2
        out.append((s, e, core_s, core_e))
    return out


class NerTask:
    kind = "ner"
    example_type = Sentence
    head = "token-classification"
    new_head = True  # a freshly initialised classifier: trained (and saved) under every tuning method
    predicts = True  # it makes predictions (tunelab predict, serve)
    token_level = True  # one output row per input token
    tag_sequences = True  # a tag per word, scored as a sequence: model.crf can decode it
    outputs = ("jsonl", "conll")  # prediction file formats
    ranks_labels = False  # labels per word, not one ranked list
    main_name = "entity micro-F1"  # what `main` is, in reports
    score_name = "entity micro-F1"  # the 0-1 score multi-task selection averages
    curve_title = "dev entity F1"
    new_tokens_bound = None  # not a generator
    donor_rank = 2  # which task model lends the shared backbone in multi-task runs (lowest first)
    decoder_only = False  # any backbone with a token-classification head will do

    def __init__(self, tokenizer, labels: list[str], max_length: int, context_sentences: int = 0, crf: bool = False):
        self.tokenizer = tokenizer
        self.labels = labels
        self.label2id = {label: i for i, label in enumerate(labels)}
        self.max_length = max_length
        self.context_sentences = context_sentences
        self.pad = pad_id(tokenizer)
        self.prefix, self.suffix = special_tokens(tokenizer)
        self.budget = max_length - len(self.prefix) - len(self.suffix)
        self.allowed, self.start_allowed = iob2_transitions(labels)
        self.crf = crf  # model.crf: the model carries a CRF (tunelab.models.crf) that scores and decodes
        self.crf_scores = None  # its transition scores, taken from the model each time it predicts

    def encode(self, sentences: list[Sentence], training: bool) -> list[dict]:
        pieces = word_pieces(self.tokenizer, [s.words for s in sentences])
        overlap = 0 if training else self.budget // 4
        feats = []
        for i, sent in enumerate(sentences):
            counts = [len(p) for p in pieces[i]]
            spans = windows(counts, self.budget, overlap)
            for start, end, core_s, core_e in spans:
                left, right = ([], [])
                if len(spans) == 1 and self.context_sentences:
                    left, right = self._context(sentences, pieces, i, self.budget - sum(counts))
                ids, labels, positions = list(self.prefix) + left, [IGNORE] * (len(self.prefix) + len(left)), []
                for w in range(start, end):
                    p = pieces[i][w][: self.budget]
                    if core_s <= w < core_e:
                        positions.append((w, len(ids)))
                        gold = self.label2id[sent.tags[w]] if sent.tags is not None else IGNORE
                        labels.extend([gold] + [IGNORE] * (len(p) - 1))
                    else:
                        labels.extend([IGNORE] * len(p))
                    ids.extend(p)
                ids += right + list(self.suffix)
                labels += [IGNORE] * (len(right) + len(self.suffix))
                feats.append({"input_ids": ids, "labels": labels, "example": i, "positions": positions})
        return feats

    def _context(self, sentences, pieces, i, room) -> tuple[list[int], list[int]]:
        """Sub-tokens of up to `context_sentences` whole neighbouring sentences on each side, from the same
        document, nearest first, while they fit in `room`."""
        left, right = [], []
        doc = sentences[i].doc
        for d in range(1, self.context_sentences + 1):
            for j, side in ((i - d, "left"), (i + d, "right")):
                if 0 <= j < len(sentences) and sentences[j].doc == doc and sentences[j].source == sentences[i].source:
                    ids = [t for p in pieces[j] for t in p]
                    if len(ids) <= room:
                        room -= len(ids)
                        if side == "left":
                            left = ids + left
                        else:
                            right = right + ids
        return left, right

    def decode(self, features, logits, n_examples, crf_scores=None):
        """Per example: (tags, scores) for every word. The tags are the most probable *valid* IOB2 sequence
        (constrained Viterbi): a per-word argmax can say O I-PER or B-PER I-ORG, which strict scoring and
        users then have to guess about; patching such an I- into a B- after the fact adds false entities.
        With a CRF (`crf_scores`, else the scores the model last predicted with), the path maximises the
        words' logits plus the CRF's transition, start and end scores. A word's score is its tag's softmax
        probability from the logits."""
        crf_scores = crf_scores if crf_scores is not None else self.crf_scores
        if self.crf and crf_scores is None:
            raise TunelabError("this NER model decodes with a CRF, but none was given (its crf.safetensors)")
        word_logits = [dict() for _ in range(n_examples)]
        for feat, lg in zip(features, logits):
            lg = np.asarray(lg, dtype=np.float32)
            for w, pos in feat["positions"]:
                word_logits[feat["example"]][w] = lg[pos]
        out = []
        for wl in word_logits:
            lg = np.stack([wl[w] for w in range(len(wl))])
            probs = np.exp(lg - lg.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            if self.crf:
                path = viterbi(lg, self.allowed, self.start_allowed, crf_scores["transitions"],
                               crf_scores["start"], crf_scores["end"])
            else:
                path = viterbi(np.log(np.maximum(probs, 1e-12)), self.allowed, self.start_allowed)
            out.append(([self.labels[k] for k in path], [float(probs[i, k]) for i, k in enumerate(path)]))
        return out

    def metrics(self, sentences, predictions) -> dict:
        from tunelab.metrics import entity_metrics

        return entity_metrics([s.tags for s in sentences], [p[0] for p in predictions])

    def predict(self, model, examples, device, bf16=False, batch_size=64, desc=None, max_new_tokens=None,
                dist=None) -> list:
        """Per example: (tags, scores); with a CRF, decoded by the model's current transition scores."""
        if self.crf:
            if getattr(model, "crf", None) is None:
                raise TunelabError("this NER task decodes with a CRF, but the model has none (model.crf)")
            self.crf_scores = model.crf.scores()
        return predict_by_logits(self, model, examples, device, bf16, batch_size, desc, max_new_tokens, dist)

    evaluate = evaluate_by_predictions

    def objective(self, forward):
        """The training forward: the model's own cross-entropy, or with a CRF its sequence NLL per word
        (tunelab.models.crf.CRF.word_loss, reached through the model's `crf` submodule)."""
        if not self.crf:
            return forward

        def run(**batch):
            labels = batch.pop("labels")
            out = forward(**batch)
            crf = getattr(forward, "module", forward).crf  # (the model inside a DDP wrapper)
            out["loss"] = crf.word_loss(out.logits, labels)
            return out
        return run

    # ---- what the task is, outside one tokenizer: data, model class, options, saved metadata, records ----

    noun = "an NER"  # "data.dataset=X is an NER set"

    @staticmethod
    def reader(path, fmt: str, labelled: bool, f):
        """CoNLL columns or JSONL token lists -> Sentence; unlabelled also text lines, or JSONL records with raw
        text in the text field instead of a token list -> raw TextExample (split into words by text_examples).
        f: tunelab.data.kinds.Fields. Lazy: examples and BadLines."""
        from tunelab.data.readers import conll_sentences, jsonl_sentences, text_lines

        if fmt == "conll":
            return conll_sentences(path, f.tag_column if labelled else None, f.tag_scheme)
        if fmt == "jsonl":
            return jsonl_sentences(path, f.field("tokens_field"), f.field("tags_field") if labelled else None,
                                   f.tag_scheme, None if labelled else f.field("text_field"))
        if fmt == "text" and not labelled:
            return text_lines(path)
        if labelled:
            raise TunelabError(f"{path}: NER data must be CoNLL columns or JSONL with {f.tokens_field!r}/"
                               f"{f.tags_field!r}")
        raise TunelabError(f"{path}: NER input must be text lines, CoNLL columns or JSONL with {f.tokens_field!r}")

    @staticmethod
    def from_record(r, i: int) -> Sentence:
        """An in-memory record {"tokens": [...], "tags": [...]} (or a (tokens, tags) pair), tags in IOB2."""
        from tunelab.data.tags import to_iob2

        words, tags = (r.get("tokens"), r.get("tags")) if isinstance(r, dict) else r
        if not words or (tags is not None and len(tags) != len(words)):
            raise TunelabError(f"record {i}: needs non-empty tokens and one tag per token")
        if tags is not None:
            try:
                tags = to_iob2([str(t) for t in tags], "iob2")
            except ValueError as e:
                raise TunelabError(f"record {i}: {e}") from None
        return Sentence(list(words), tags, i, "<memory>", i)

    @staticmethod
    def hf_records(ds, f) -> list[dict]:
        """A `datasets.Dataset`'s rows as records; an integer ClassLabel tag column becomes tag names."""
        from tunelab.tasks.common import require_columns

        require_columns(ds, [f.tokens_field, f.tags_field])
        names = getattr(getattr(ds.features[f.tags_field], "feature", None), "names", None)
        return [{"tokens": r[f.tokens_field], "tags": [names[t] for t in r[f.tags_field]] if names else
                 r[f.tags_field]} for r in ds]

    @staticmethod
    def label_list(train: list) -> list[str]:
        from tunelab.data.tags import label_list

        return label_list(s.tags for s in train)

    @staticmethod
    def gold(example) -> list:
        """The gold labels of one example (none for unlabelled input)."""
        return example.tags or []

    @staticmethod
    def check_kept_labels(train: list, keep: list[str]) -> None:
        """data.only_labels names entity types (PER, not B-PER) that the training data has."""
        from tunelab.data.tags import entity_types, label_list
        from tunelab.tasks.common import check_known

        check_known(keep, entity_types(label_list(s.tags for s in train if s.tags)), "entity types",
                    "; name entity types, not tags")

    @staticmethod
    def keep_labels(examples: list, keep: list[str]) -> list:
        """The sentences with the entities of other types tagged O (what a corpus annotated only for
        `keep` looks like: class-incremental NER)."""
        from dataclasses import replace

        return [replace(s, tags=_only_types(s.tags, set(keep))) if s.tags else s for s in examples]

    @staticmethod
    def merge_predictions(examples: list, predictions: list) -> list:
        """Sentences whose O words take a predicted entity's tag (pseudo-labels from a model that knows other
        entity types than these annotations do); the annotated entities win where the two overlap."""
        from dataclasses import replace

        from tunelab.data.tags import repair_iob2

        out = []
        for s, (tags, _) in zip(examples, predictions):
            # (a predicted entity cut by an annotated one keeps its part before; its part after starts anew)
            merged = repair_iob2([g if g != "O" else p for g, p in zip(s.tags, tags)])
            out.append(replace(s, tags=merged) if merged != s.tags else s)
        return out

    @staticmethod
    def restrict_predictions(predictions: list, labels: list[str]) -> list:
        """Predictions as a tagger of `labels` only would make them: entities of other types become O."""
        types = {t[2:] for t in labels if t != "O"}
        return [(_only_types(tags, types), scores) for tags, scores in predictions]

    epoch_features = same_every_epoch
    settle = no_decision_to_settle

    @staticmethod
    def model_class(config):
        from transformers import AutoModelForTokenClassification

        return AutoModelForTokenClassification

    @staticmethod
    def peft_type(config):
        import peft

        return peft.TaskType.TOKEN_CLS

    configure = staticmethod(set_labels)  # the model config's head size and id2label

    @staticmethod
    def options(data, model_config) -> dict:
        """This task's settings from the data config (and the model's config), as the constructor takes them
        and tunelab.json keeps them."""
        return {"context_sentences": data.context_sentences}

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, labels, max_length, options.get("context_sentences", 0), options.get("crf", False))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": self.labels, "max_length": self.max_length,
                "context_sentences": self.context_sentences, **({"options": {"crf": True}} if self.crf else {})}

    def describe(self) -> dict:
        """What the HTTP API says about this task."""
        return {"kind": self.kind, "labels": self.labels,
                "entity_types": sorted({lab[2:] for lab in self.labels if lab[:2] in ("B-", "I-")})}

    format_main = staticmethod(percent)
    score = staticmethod(main_score)
    curve_value = staticmethod(as_is)
    samples = no_samples

    @staticmethod
    def text_examples(texts: list) -> tuple[list, list]:
        """Raw texts (TextExample) as sentences of words, and offsets[i] = (text, [(start, end) of each
        word]). A text is its own document, so unrelated texts never serve as each other's context."""
        examples, offsets = [], []
        for t in texts:
            words, offs = split_words(t.text)
            if not words:
                raise TunelabError(f"{where(t.source, t.line)}: no words in this text")
            examples.append(Sentence(words, None, len(examples), t.source, t.line))
            offsets.append((t.text, offs))
        return examples, offsets

    @staticmethod
    def records(labels, examples, predictions, offsets=None):
        """One JSON-ready record per example: text (raw input only), tokens, tags and entities (type, score =
        mean word score, text, and character start/end into the raw text, or first/last word for pre-split
        input)."""
        for i, (ex, (tags, scores)) in enumerate(zip(examples, predictions)):
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

    @staticmethod
    def conll(examples, predictions, doc=None) -> tuple[str, int | None]:
        """Predictions as CoNLL columns (word [gold] predicted), for -o FILE.conll."""
        from tunelab.data.conll import conll_columns

        return conll_columns(examples, [p[0] for p in predictions], doc)


def _only_types(tags: list[str], types: set) -> list[str]:
    return [t if t == "O" or t[2:] in types else "O" for t in tags]


def iob2_transitions(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """allowed[i, j]: label j may follow label i in IOB2 (I-X only after B-X or I-X); start[j]: j may begin."""
    inside = [lab.startswith("I-") for lab in labels]
    allowed = np.array([[not inside[j] or (prev != "O" and prev[2:] == cur[2:]) for j, cur in enumerate(labels)]
                        for prev in labels])
    return allowed, ~np.array(inside)


def viterbi(logp: np.ndarray, allowed: np.ndarray, start: np.ndarray, transitions=None, start_scores=None,
            end_scores=None) -> list[int]:
    """Most probable label path under hard transition constraints. logp: (words, labels) log-probabilities
    (or a CRF's emission scores, with its `transitions` [previous, next], `start_scores` and `end_scores`).
    Without CRF scores, where the per-word argmax is already valid it is returned unchanged."""
    neg = -1e30
    trans = np.where(allowed, 0.0 if transitions is None else transitions, neg)
    score = np.where(start, logp[0] + (0.0 if start_scores is None else start_scores), neg)
    back = []
    for t in range(1, len(logp)):
        cand = score[:, None] + trans  # (previous label, current label)
        prev = cand.argmax(0)
        score = cand[prev, np.arange(len(prev))] + logp[t]
        back.append(prev)
    if end_scores is not None:
        score = score + end_scores
    path = [int(score.argmax())]
    for prev in reversed(back):
        path.append(int(prev[path[-1]]))
    return path[::-1]


# One CJK character is one word, as BERT's basic tokenizer treats it; elsewhere runs of word characters and
# single punctuation marks.
_CJK = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002fa1f"
_WORD = re.compile(f"[{_CJK}]|[^\\W_]+|\\S")
_CJK_WORD = re.compile(f"[{_CJK}\u3000-\u303f\uff00-\uffef]+")  # (with CJK punctuation and full-width forms)


def split_words(text: str) -> tuple[list[str], list[tuple[int, int]]]:
    """Words of raw text with their (start, end) character offsets."""
    words, offsets = [], []
    for m in _WORD.finditer(text):
        words.append(m.group())
        offsets.append(m.span())
    return words, offsets


def entity_spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """(type, first word, last word + 1) of each IOB2 entity."""
    spans, cur = [], None
    for i, tag in enumerate(tags + ["O"]):
        if cur and not (tag.startswith("I-") and tag[2:] == cur[0]):
            spans.append((cur[0], cur[1], i))
            cur = None
        if tag.startswith("B-") or (tag.startswith("I-") and cur is None):
            cur = (tag[2:], i)
    return spans
