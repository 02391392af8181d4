"""Sequence rewards: plain callables `(prompts, completions, references, **kw) -> list[float]`, one score per
completion, higher is better. `kw` carries `completion_ids` (token ids) for rewards that work on tokens.

Built in: sacreBLEU sentence BLEU and rouge-score ROUGE-L F (against the reference; 0..1), the probability
of a label under a tunelab classifier folder, length and repetition penalties; any function `module:function`
with the same signature; and weighted sums of these (`build`).
"""

import importlib
import math
from collections import Counter

from tunelab.errors import TunelabError

BUILTIN = ("bleu", "rouge_l", "classifier", "length", "repetition")


def bleu(prompts, completions, references, **kw) -> list[float]:
    """Sentence BLEU (sacreBLEU, exponential smoothing, its standard 13a tokenisation) / 100."""
    import sacrebleu

    _need_references(references, "bleu")
    return [sacrebleu.sentence_bleu(c, [r]).score / 100 for c, r in zip(completions, references)]


def rouge_l(prompts, completions, references, **kw) -> list[float]:
    """ROUGE-L F-measure (rouge-score, Porter stemming), 0..1."""
    _need_references(references, "rouge_l")
    scorer = _rouge()
    return [scorer.score(r, c)["rougeL"].fmeasure for c, r in zip(completions, references)]


def _rouge():
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE


_ROUGE = None


def _need_references(references, name):
    if references is None or any(r is None for r in references):
        raise TunelabError(f"reward {name} compares with a reference output, but the prompts have none; use "
                           "data with a target field or another reward")


def length_penalty(target_words: int):
    """-|words - target| / target: 0 at the target length, -1 at no words or twice the target."""

    def length(prompts, completions, references, **kw) -> list[float]:
        return [-abs(len(c.split()) - target_words) / target_words for c in completions]

    return length


def repetition(prompts, completions, references, **kw) -> list[float]:
    """Minus the share of a completion's word bigrams that repeat an earlier one (0 for no repetition,
    towards -1 for a loop): the usual failure of a policy that found one rewarded phrase."""
    out = []
    for c in completions:
        words = c.lower().split()
        grams = list(zip(words, words[1:]))
        out.append(-(len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return out


class ClassifierReward:
    """P(label) under a tunelab classification folder, read from the completion alone or from prompt +
    completion (`on="full"`: a continuation is judged together with the text it continues)."""

    def __init__(self, folder, label: str, on: str = "completion", device="auto", bf16: bool = False):
        from tunelab.predict import Predictor

        self.predictor = Predictor(folder, device=device, bf16=bf16)
        meta, task = self.predictor.meta, self.predictor.task
        if task is None or not task.ranks_labels:  # a probability per label is what it rewards
            raise TunelabError(f"rl.classifier={folder}: a {meta['task']} model; the classifier reward needs a "
                               "classification folder (task: classify)")
        if label not in meta["labels"]:
            raise TunelabError(f"rl.classifier_label={label!r} is not a label of {folder} "
                               f"({', '.join(meta['labels'])})")
        self.index, self.on = meta["labels"].index(label), on

    def __call__(self, prompts, completions, references, **kw) -> list[float]:
        from tunelab.data.examples import TextExample

        texts = [(p + " " + c if self.on == "full" else c).strip() or "." for p, c in zip(prompts, completions)]
        return [probs[self.index] for _, probs in self.predictor.predict([TextExample(t) for t in texts])]


def user_function(spec: str):
    """`package.module:function`, imported; checked to be callable."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise TunelabError(f"rl.rewards: cannot import {spec!r} ({e}); give an importable module:function "
                           "(the module on PYTHONPATH or in the working directory)") from None
    if not callable(fn):
        raise TunelabError(f"rl.rewards: {spec} is not callable")
    return fn


class Combined:
    """sum_j weight_j * reward_j, with each part's scores kept for logging (`last_parts`)."""

    def __init__(self, parts: dict[str, tuple[float, object]]):
        self.parts = parts
        self.last_parts: dict[str, list[float]] = {}

    def __call__(self, prompts, completions, references, **kw) -> list[float]:
        total = [0.0] * len(completions)
        self.last_parts = {}
        for name, (weight, fn) in self.parts.items():
            scores = fn(prompts, completions, references, **kw)
            scores = _checked(scores, len(completions), name)
            self.last_parts[name] = scores
            total = [t + weight * s for t, s in zip(total, scores)]
        return total

    def part_means(self) -> dict[str, float]:
        """Each part's mean score over the last call's completions (for logs and reports)."""
        return {n: sum(v) / len(v) for n, v in self.last_parts.items()}


def _checked(scores, n: int, name: str) -> list[float]:
    try:
        scores = [float(s) for s in scores]
    except (TypeError, ValueError):
        raise TunelabError(f"reward {name} must return a list of numbers, one per completion") from None
    if len(scores) != n:
        raise TunelabError(f"reward {name} returned {len(scores)} scores for {n} completions")
    bad = next((s for s in scores if not math.isfinite(s)), None)
    if bad is not None:
        raise TunelabError(f"reward {name} returned {bad} (not a finite number)")
    return scores


def build(rl, device="auto", bf16: bool = False) -> Combined:
    """The weighted sum named by config section `rl` (RLConfig): rl.rewards maps names to weights."""
    parts = {}
    for name, weight in rl.rewards.items():
        if ":" in name:
            fn = user_function(name)
        elif name == "bleu":
            fn = bleu
        elif name == "rouge_l":
            fn = rouge_l
        elif name == "length":
            fn = length_penalty(rl.target_words)
        elif name == "repetition":
            fn = repetition
        elif name == "classifier":
            fn = ClassifierReward(rl.classifier, rl.classifier_label, rl.classifier_input, device, bf16)
        else:
            raise TunelabError(f"config key 'rl.rewards.{name}': unknown reward; built in: {', '.join(BUILTIN)}, "
                               "or a function as module:function")
        parts[name] = (weight, fn)
    return Combined(parts)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n (Li et al., 2016): distinct word n-grams over all n-grams of all outputs together."""
    grams = Counter(g for t in texts for g in zip(*(t.lower().split()[i:] for i in range(n))))
    total = sum(grams.values())
    return len(grams) / total if total else 0.0
