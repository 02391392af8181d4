"""int8 dynamic quantisation for inference (`tunelab serve --quantize int8`, `tunelab export --onnx --quantize
int8`), and the accuracy check that every quantised model passes before it is used.

Dynamic quantisation stores each Linear layer's weights as int8 (one scale per output channel) and quantises
the activations per batch at run time; embeddings, LayerNorm and the attention softmax stay float32. It needs
no calibration data. On the 2-core development CPU it runs a MiniLM NER model about 1.7x as fast as float32 on
batches of whole sentences, but not faster on the small forward passes of one-sentence server requests, and
it costs about half an F1 point (docs/benchmarks.md). The check: the quantised model's predictions (the argmax
at every NER word's first sub-token, or of every text's row) on real inputs must agree with the float
model's on at least `min_agreement` of them; a model that quantises badly (outlier activations that one
scale per tensor cannot hold) is refused with the figure, not served or written. It covers the task types
whose prediction is an argmax (NER, classification, relation extraction); for the others (a regression
score, multi-label thresholds, QA spans) an argmax check would say nothing, so they are refused.
"""

import warnings

import numpy as np
import torch

from tunelab.errors import TunelabError

KINDS = ("int8",)
# A broken quantisation (outlier activations) agrees on a few tenths of the predictions; a sound one on over
# 99 % (the CoNLL quick-start model: 99.5 %), an under-trained model with many near-ties on about 97 %.
MIN_AGREEMENT = 0.95

# The inputs of parity and agreement checks (ONNX export, int8) when no --check-data is given: short and long,
# punctuation, non-ASCII, and one text long enough to be cut into windows (NER) or truncated (classification).
CHECK_TEXTS = [
    "Angela Merkel flew to Paris on Monday .",
    "EU rejects German call to boycott British lamb .",
    "Peter Blackburn",
    "Shares in Siemens rose 3.5 percent after the company said profits at its Munich unit doubled .",
    "Zürich , São Paulo and 東京 are cities ; 😀 is not .",
    "The talks in Geneva ended without a deal , said a spokesman for the United Nations . " * 30,
]

RELATION_CHECK_TEXTS = [  # relation extraction reads texts with the two mentions marked
    "<e1:PER>Angela Merkel</e1> flew to <e2:LOC>Paris</e2> on Monday .",
    "<e2:ORG>Siemens</e2> said <e1:PER>Peter Blackburn</e1> will lead its Munich unit .",
    "<e1>Zürich</e1> and <e2>東京</e2> are cities ; 😀 is not .",
    "The talks in Geneva ended without a deal , said a spokesman for the United Nations . " * 30 +
    "<e1:ORG>EU</e1> rejects German call to boycott <e2:MISC>British</e2> lamb .",
]


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise TunelabError(f"--quantize {kind}: unknown; choose one of {', '.join(KINDS)}")


CHECKED = ("ner", "classify", "relation")  # task types whose prediction is the argmax the check compares


def refuse_unsupported(task, device) -> None:
    """Dynamic int8 kernels are CPU kernels, and the check compares argmax predictions."""
    if getattr(device, "type", str(device)) != "cpu":
        raise TunelabError("--quantize int8 runs on the CPU (dynamic int8 kernels are CPU kernels); use "
                           "--device cpu, or leave out --quantize on a GPU")
    if not task.predicts or task.kind not in CHECKED:
        raise TunelabError(f"--quantize int8 covers NER, classification and relation extraction models, whose "
                           f"predictions its agreement check can compare; not a {task.kind} model")


def int8_dynamic(model: torch.nn.Module) -> torch.nn.Module:
    """`model`, in place, with every nn.Linear replaced by torch's dynamically quantised int8 Linear
    (per-channel weights). torch marks its eager quantisation API deprecated in favour of torchao; it is kept
    here because it needs no extra package and its x86 kernels (fbgemm) are what makes int8 pay on a CPU."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation notices, once per layer
        return quantize_dynamic(model.eval(), {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def agreement(reference: list, quantised: list, features: list[dict]) -> tuple[float, int]:
    """Share of the predicted positions where the argmax agrees, and how many were compared. A feature's
    logits are (seq, labels) or (labels,); an NER feature's predicted positions are its words' first
    sub-tokens (its "positions"), not special tokens, later sub-tokens or context."""
    same = total = 0
    for ref, got, f in zip(reference, quantised, features):
        a, b = np.asarray(ref).argmax(-1), np.asarray(got).argmax(-1)
        if a.ndim == 1 and f.get("positions"):
            at = [p for _, p in f["positions"]]
            a, b = a[at], b[at]
        same += int(np.sum(a == b))
        total += int(np.size(a))
    return same / max(1, total), total


def check_features(task, texts: list[str] | None = None) -> list[dict]:
    """The check inputs (`texts`, else the built-in ones for the task's kind), encoded as `tunelab predict`
    encodes raw text (long texts windowed)."""
    from tunelab.data.examples import TextExample

    texts = texts or (RELATION_CHECK_TEXTS if task.kind == "relation" else CHECK_TEXTS)
    examples, _ = task.text_examples([TextExample(x, None, "<check>", i + 1) for i, x in enumerate(texts)])
    return task.encode(examples, training=False)


def require_agreement(reference: list, quantised: list, features: list[dict], min_agreement: float,
                      what: str) -> dict:
    share, positions = agreement(reference, quantised, features)
    worst = max((float(np.max(np.abs(np.asarray(r, dtype=np.float64) - np.asarray(q, dtype=np.float64))))
                 for r, q in zip(reference, quantised)), default=0.0)
    doc = {"kind": "int8 dynamic", "agreement": share, "positions": positions, "min_agreement": min_agreement,
           "max_abs_logit_diff": worst}
    if share < min_agreement:
        raise TunelabError(f"{what}: the int8 model's predictions agree with the float model's on only {share:.1%} "
                           f"of {positions} positions (at least {min_agreement:.0%} required): its weights do not "
                           "quantise well. Use the float model (leave out --quantize), or lower --min-agreement "
                           "if that is acceptable")
    return doc
