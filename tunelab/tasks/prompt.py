"""Classification by prompting a causal LM: a template turns each text into the model's own kind of text, and
the label whose words (the verbalizer) the model finds likeliest next is the prediction
(tunelab.prompting says how words are scored, normalised and calibrated).

It works zero-shot (an untuned model: a recipe with train.epochs=0, or `tunelab predict/eval MODEL --template
... --labels ...`), few-shot in context (data.prompt.shots demonstrations from the training split, drawn at
random once or the most similar to each input by a sentence encoder), and as pattern-exploiting training
(PET, Schick & Schütze 2021): fine-tuning, fully or through peft, on the cross-entropy of the label scores
over the labels, so that what training optimises is exactly what prediction decides by.

The examples are classification's (text, or text pair, and label) and so are the files it reads, the metrics
(macro-F1) and the prediction records. The saved folder is the causal LM (plain transformers loads it; its
head is the LM head) with the template, the verbalizer and the demonstration pool in tunelab.json.
"""

import random
import re

from tunelab.data.examples import TextExample
from tunelab.tasks.classify import ClassifyTask
from tunelab.tasks.common import (as_is, check_pairs, evaluate_by_predictions, main_score, masked_encoder,
                                  no_decision_to_settle, no_samples, nothing_to_fill, pad_id, percent,
                                  predictions_as_given, same_every_epoch, special_tokens)

TEXT, PAIR = "{text}", "{text_pair}"
DEFAULTS = {"template": "{text}\nAnswer:", "verbalizer": {}, "chat": False, "normalize": True, "calibrate": False,
            "content_free": ["N/A", "", "[MASK]"], "shots": 0, "select": "random", "retriever": "all-MiniLM-L6-v2",
            "demo_tokens": 96, "pool": 512, "seed": 0}


class PromptTask:
    kind = "prompt"
    example_type = TextExample  # (classification's examples: task_of() names classify for them)
    head = "causal-lm"
    new_head = False  # the LM head is pretrained: its label words are the classifier
    predicts = True  # it makes predictions (tunelab predict, serve)
    token_level = False
    tag_sequences = False  # (model.crf is for tag sequences: NER)
    outputs = ("jsonl",)
    ranks_labels = True
    main_name = "macro-F1"
    score_name = "macro-F1"
    curve_title = "dev macro-F1"
    new_tokens_bound = None
    decoder_only = True
    donor_rank = 0

    def __init__(self, tokenizer, labels: list[str], max_length: int, pairs: bool = False,
                 settings: dict | None = None, demonstrations: list | None = None):
        from tunelab.errors import TunelabError

        self.tokenizer, self.labels, self.max_length, self.pairs = tokenizer, list(labels), max_length, pairs
        s = self.settings = DEFAULTS | (settings or {})
        self.template = s["template"]
        if TEXT not in self.template or (PAIR in self.template) != pairs:
            raise TunelabError(f"data.prompt.template {self.template!r} must hold {TEXT}" + (
                f" and {PAIR} (the model reads text pairs)" if pairs else
                f" (and {PAIR} only for text pairs: data.text_pair_field)"))
        self.label2id = {label: i for i, label in enumerate(self.labels)}
        unknown = [k for k in s["verbalizer"] if k not in self.label2id]
        if unknown:
            raise TunelabError(f"data.prompt.verbalizer: {', '.join(map(repr, unknown))} not among the labels "
                               f"({', '.join(self.labels)})")
        self.verbalizer = {label: list(s["verbalizer"].get(label) or [label]) for label in self.labels}
        # The answer follows the prompt as running text does (" positive" after "Sentiment:"); in a chat the
        # assistant's turn starts on a fresh line.
        self.lead = "" if s["chat"] or self.template[-1:].isspace() else " "
        self.words, self.word_label = [], []
        seen = {}
        for label, words in self.verbalizer.items():
            for w in words:
                ids = tokenizer(self.lead + w, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise TunelabError(f"data.prompt.verbalizer: the word {w!r} of label {label!r} is no token at all")
                if tuple(ids) in seen:
                    raise TunelabError(f"data.prompt.verbalizer: {w!r} is a word of both {seen[tuple(ids)]!r} and "
                                       f"{label!r}; each word may name one label")
                seen[tuple(ids)] = label
                self.words.append(ids)
                self.word_label.append(self.label2id[label])
        self.opening = special_tokens(tokenizer)[0]  # e.g. Gemma's <bos>; none for SmolLM2
        self.pad = pad_id(tokenizer, tokenizer.eos_token_id or 0)
        self.pool = [TextExample(t, label, "<demonstrations>", i, text_pair=p)
                     for i, (t, p, label) in enumerate(demonstrations or [])]
        self._pool_vectors = None
        self._shown = {}  # id of a pool example -> its filled template (the same ones precede many inputs)
        self.truncated = 0

    # ---- prompts ----

    def _cut(self, text: str, limit: int | None) -> str:
        """`text` with at most `limit` tokens (None: all), cut at a token's end in the original characters."""
        if limit is None:
            return text
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) <= limit:
            return text
        return text[: enc["offset_mapping"][limit - 1][1]] if limit > 0 else ""

    def _filled(self, ex, limit: int | None = None) -> str:
        slots = {TEXT: self._cut(ex.text, limit)} | ({PAIR: self._cut(ex.text_pair, limit)} if self.pairs else {})
        # one pass, so that a text holding "{text_pair}" stays as written
        return re.sub("|".join(map(re.escape, slots)), lambda m: slots[m.group(0)], self.template)

    def _demo(self, d) -> str:
        """A demonstration's filled template (its text cut to demo_tokens), tokenised to cut it only once."""
        if id(d) not in self._shown:
            self._shown[id(d)] = self._filled(d, self.settings["demo_tokens"])
        return self._shown[id(d)]

    def _ids(self, ex, demos: list, limit: int | None = None) -> list[int]:
        answer = [self.verbalizer[d.label][0] for d in demos]
        if self.settings["chat"]:
            turns = [m for d, a in zip(demos, answer) for m in (
                {"role": "user", "content": self._demo(d)},
                {"role": "assistant", "content": a})]
            text = self.tokenizer.apply_chat_template(turns + [{"role": "user", "content": self._filled(ex, limit)}],
                                                      tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        shown = [self._demo(d) + self.lead + a for d, a in zip(demos, answer)]
        text = "\n\n".join(shown + [self._filled(ex, limit)])
        return self.opening + self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt_ids(self, ex, demos: list) -> list[int]:
        """The token ids of the prompt for `ex` after `demos`, at most max_length minus the longest label word:
        when the whole would be longer, the input's text (each text of a pair alike) keeps only as many tokens
        as leave room, losing its end; if the demonstrations alone leave none, the prompt loses its start."""
        room = self.max_length - max(map(len, self.words))
        ids = self._ids(ex, demos)
        if len(ids) <= room:
            return ids
        self.truncated += 1
        longest = max(len(self.tokenizer(t, add_special_tokens=False)["input_ids"])
                      for t in ([ex.text, ex.text_pair] if self.pairs else [ex.text]))
        limit = longest - (len(ids) - room)
        for _ in range(4):  # token counts shift a little where the cut text meets the template
            if limit > 0:
                ids = self._ids(ex, demos, limit)
                if len(ids) <= room:
                    return ids
            limit -= 4
        return self.opening + ids[len(ids) - room + len(self.opening):]  # demonstrations alone are too long

    # ---- demonstrations ----

    def use_pool(self, examples: list) -> None:
        """The demonstration pool: the first training examples the task sees (at most `pool`, a seeded draw
        keeping every label)."""
        if self.pool or not self.settings["shots"]:
            return
        labelled = [e for e in examples if e.label is not None]
        rng = random.Random(self.settings["seed"])
        if len(labelled) > self.settings["pool"]:
            by_label = {}
            for e in labelled:
                by_label.setdefault(e.label, []).append(e)
            first = [rng.choice(v) for v in by_label.values()]
            rest = [e for e in labelled if not any(e is f for f in first)]
            labelled = first + rng.sample(rest, self.settings["pool"] - len(first))
        self.pool = labelled

    def _vectors(self, examples: list):
        from tunelab.prompting import embed_texts

        return embed_texts(self.settings["retriever"],
                           [e.text + (" " + e.text_pair if self.pairs else "") for e in examples])

    def demonstrations(self, examples: list) -> list[tuple[int, ...]]:
        """Per example, the pool indices of its demonstrations (an example of the pool never shows itself):
        `random`, one seeded draw for all, or the `similar` ones by the retriever's cosine, most similar last
        (nearest the input)."""
        k = self.settings["shots"]
        if not k:
            return [()] * len(examples)
        from tunelab.errors import TunelabError

        if len(self.pool) <= k:
            raise TunelabError(f"data.prompt.shots={k}: the demonstration pool has {len(self.pool)} examples; "
                               "give more training examples or fewer shots")
        where = {id(e): i for i, e in enumerate(self.pool)}
        if self.settings["select"] == "random":
            order = list(range(len(self.pool)))
            random.Random(self.settings["seed"]).shuffle(order)
            return [tuple([j for j in order if j != where.get(id(e))][:k]) for e in examples]
        if self._pool_vectors is None:
            self._pool_vectors = self._vectors(self.pool)
        sims = self._vectors(examples) @ self._pool_vectors.T
        for r, e in enumerate(examples):
            if id(e) in where:
                sims[r, where[id(e)]] = float("-inf")
        top = sims.topk(k, dim=-1).indices.flip(-1)  # ascending: the most similar last
        return [tuple(row.tolist()) for row in top]

    # ---- features, training, prediction ----

    def encode(self, examples: list, training: bool) -> list[dict]:
        """input_ids: the prompt (demonstrations, then the filled template); labels: the label's index (-100
        without); context: the demonstrations' pool indices (calibration is per demonstration set)."""
        if training:
            self.use_pool(examples)
        self.truncated = 0
        out = []
        check_pairs(examples, self.pairs)
        for i, (ex, demos) in enumerate(zip(examples, self.demonstrations(examples))):
            out.append({"input_ids": self.prompt_ids(ex, [self.pool[j] for j in demos]),
                        "labels": self.label2id[ex.label] if ex.label is not None else -100, "example": i,
                        "context": demos})
        return out

    def objective(self, forward):
        """The training forward: the label scores after each prompt and their cross-entropy against the gold
        label (PET's loss). Takes collate's right-padded batch (input_ids or a perturbation's inputs_embeds)."""
        import torch
        from transformers.modeling_outputs import SequenceClassifierOutput

        from tunelab.prompting import label_scores, to_left_padding, word_scores

        def run(**batch):
            labels = batch.pop("labels", None)
            batch.pop("token_type_ids", None)
            batch = to_left_padding(batch)
            embed = getattr(getattr(forward, "module", forward), "get_input_embeddings", lambda: None)()
            scores = label_scores(word_scores(forward, self.words, self.settings["normalize"], embed=embed, **batch),
                                  self.word_label, len(self.labels))
            loss = torch.nn.functional.cross_entropy(scores, labels) if labels is not None else None
            return SequenceClassifierOutput(loss=loss, logits=scores)
        return run

    def _scores(self, model, rows: list[list[int]], device, bf16, batch_size, desc, dist=None):
        """Label scores (rows, labels) of prompts, as float64 numpy."""
        import numpy as np
        import torch

        from tunelab.inference import inference_batches
        from tunelab.prompting import label_scores, left_pad, word_scores
        from tunelab.runtime import autocast, eval_mode

        out = {}
        with torch.inference_mode(), eval_mode(model):
            for _, idx in inference_batches([{"input_ids": r} for r in rows], batch_size, desc, dist):
                ids, mask = left_pad([rows[i] for i in idx], self.pad)
                with autocast(device, bf16):
                    s = word_scores(model, self.words, self.settings["normalize"], input_ids=ids.to(device),
                                    attention_mask=mask.to(device))
                s = label_scores(s.float(), self.word_label, len(self.labels)).cpu().numpy()
                for r, i in enumerate(idx):
                    out[i] = s[r]
        if dist is not None:
            out = dist.gather(out)
        return np.array([out[i] for i in range(len(rows))], dtype=np.float64).reshape(len(rows), len(self.labels))

    def predict(self, model, examples: list, device, bf16=False, batch_size=64, desc=None, max_new_tokens=None,
                dist=None) -> list:
        """Per example: (label, probabilities over the labels), calibrated when data.prompt.calibrate."""
        from tunelab.prompting import calibrated, softmax

        if max_new_tokens is not None:
            raise ValueError(f"max_new_tokens is for generation; this task is {self.kind}")
        features = self.encode(examples, training=False)
        rows = [f["input_ids"] for f in features]
        contexts = sorted({f["context"] for f in features}) if self.settings["calibrate"] else []
        free = [TextExample(t, None, "<content-free>", None, text_pair=t if self.pairs else None)
                for t in self.settings["content_free"]]
        for c in contexts:  # the content-free inputs after each demonstration set that occurs
            rows += [self.prompt_ids(f, [self.pool[j] for j in c]) for f in free]
        probs = softmax(self._scores(model, rows, device, bf16, batch_size, desc, dist))
        p = probs[:len(features)]
        if contexts:
            base = {c: probs[len(features) + n * len(free):len(features) + (n + 1) * len(free)].mean(0)
                    for n, c in enumerate(contexts)}
            p = [calibrated(row, base[f["context"]]) for row, f in zip(p, features)]
        return [(self.labels[int(row.argmax())], [float(x) for x in row]) for row in p]

    metrics = ClassifyTask.metrics  # (label, probabilities) predictions, scored as classification's
    evaluate = evaluate_by_predictions

    # ---- what the task is, outside one tokenizer (see tunelab.tasks.Task) ----

    noun = "a classification"
    reader = staticmethod(ClassifyTask.reader)
    from_record = staticmethod(ClassifyTask.from_record)
    hf_records = staticmethod(ClassifyTask.hf_records)
    label_list = staticmethod(ClassifyTask.label_list)
    gold = staticmethod(ClassifyTask.gold)
    check_kept_labels = staticmethod(ClassifyTask.check_kept_labels)
    keep_labels = staticmethod(ClassifyTask.keep_labels)
    merge_predictions = staticmethod(nothing_to_fill)
    restrict_predictions = staticmethod(predictions_as_given)
    settle = no_decision_to_settle
    epoch_features = same_every_epoch
    text_examples = staticmethod(ClassifyTask.text_examples)
    records = staticmethod(ClassifyTask.records)
    format_main = staticmethod(percent)
    score = staticmethod(main_score)
    curve_value = staticmethod(as_is)
    samples = no_samples

    @staticmethod
    def model_class(config):
        from transformers import AutoModelForCausalLM

        from tunelab.errors import TunelabError

        if config.is_encoder_decoder or masked_encoder(config):
            raise TunelabError(f"task=prompt asks a causal (decoder-only) LM for the next words; a {config.model_type} "
                               "model is not one (use e.g. model.name=SmolLM2-135M-Instruct, or task=classify)")
        return AutoModelForCausalLM

    @staticmethod
    def peft_type(config):
        import peft

        return peft.TaskType.CAUSAL_LM

    @staticmethod
    def configure(config, labels) -> None:
        """No head to size: the label words are read from the LM head."""

    @staticmethod
    def options(data, model_config) -> dict:
        from dataclasses import asdict

        return {"pairs": data.text_pair_field is not None, "prompt": asdict(data.prompt)}

    @classmethod
    def build(cls, tokenizer, labels, max_length, options: dict):
        return cls(tokenizer, labels, max_length, options.get("pairs", False), options.get("prompt"),
                   options.get("demonstrations"))

    def meta(self) -> dict:
        return {"task": self.kind, "labels": self.labels, "max_length": self.max_length, "context_sentences": 0,
                "options": {"pairs": self.pairs, "prompt": self.settings,
                            "demonstrations": [[e.text, e.text_pair, e.label] for e in self.pool]}}

    def describe(self) -> dict:
        return {"kind": self.kind, "labels": self.labels, "pairs": self.pairs, "template": self.template,
                "verbalizer": self.verbalizer, "shots": self.settings["shots"]}


def zero_shot_meta(template: str, labels: str, max_length: int, pairs: bool = False, **settings) -> dict:
    """What a tunelab.json of a prompt task would say, for asking an untuned causal LM (`tunelab predict/eval
    MODEL --template ... --labels ...`). labels: "pos=great|good,neg=bad" (a label without "=" is said by its
    own name)."""
    from tunelab.errors import TunelabError

    verbalizer = {}
    for part in labels.split(","):
        label, _, words = part.partition("=")
        label = label.strip()
        if not label or label in verbalizer:
            raise TunelabError(f"--labels {labels!r}: {'an empty' if not label else 'a repeated'} label name "
                               f"{label!r}; give LABEL[=WORD|WORD...],...")
        verbalizer[label] = [w for w in (x.strip() for x in words.split("|")) if w] or [label]
    if len(verbalizer) < 2:
        raise TunelabError(f"--labels {labels!r}: give at least two labels, separated by commas")
    return {"task": PromptTask.kind, "labels": list(verbalizer), "max_length": max_length, "context_sentences": 0,
            "options": {"pairs": pairs, "prompt": DEFAULTS | {"template": template, "verbalizer": verbalizer}
                        | settings}}
