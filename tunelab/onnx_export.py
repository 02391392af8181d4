"""`tunelab export MODEL_DIR OUT --onnx`: a single-text encoder model (NER, classification, regression,
multi-label, relation extraction) as ONNX, checked against PyTorch before it is written.

The graph takes what tunelab's own batches hold, `input_ids` and `attention_mask` (int64, (batch, sequence),
both axes dynamic), and returns `logits`: (batch, sequence, labels) for NER, (batch, labels) for
classification. It is exported with torch.onnx's dynamo exporter (the TorchScript one traces BERT's attention
mask into a constant and gives wrong logits for other shapes). Before anything is written, onnxruntime runs the
graph on real inputs, encoded by the task exactly as `tunelab predict` encodes them and batched differently
from the export example (other batch sizes, other lengths, padding), and every real token's logits must be
within `atol` of the PyTorch model's; otherwise the export fails and leaves nothing behind.

The output folder: model.onnx, config.json (id2label), the tokenizer, and onnx.json (task, labels, inputs and
outputs, the parity figures).
"""

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from tunelab.errors import TunelabError
from tunelab.models import crf
from tunelab.quantize import MIN_AGREEMENT, check_features, check_kind, refuse_unsupported, require_agreement

OPSET = 18
def export_onnx(model_dir, output, task: str | None = None, texts: list[str] | None = None,
                atol: float = 1e-4, device: str = "cpu", quantize: str | None = None,
                min_agreement: float = MIN_AGREEMENT) -> dict:
    """Export, check and write; returns what onnx.json holds. Raises TunelabError when the model cannot be
    exported as an encoder or when onnxruntime's logits differ from PyTorch's by more than `atol`.
    quantize="int8": the checked float graph is then quantised by onnxruntime's dynamic quantisation (int8
    weights per channel, activations per batch) and written as model.onnx in its place, if its predictions
    agree with PyTorch's on at least `min_agreement` of the check inputs' positions (else nothing is
    written)."""
    ort = _onnxruntime()
    from tunelab.inference import feature_logits
    from tunelab.predict import Predictor

    if quantize:
        check_kind(quantize)
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise TunelabError(f"{output} already exists and is not an empty folder; choose a new output folder")
    pred = Predictor(model_dir, device)
    t = pred.task_for(task=task)
    if t.new_tokens_bound is not None:
        raise TunelabError(f"{model_dir}: a generation model; ONNX export covers encoder models (NER, "
                           "classification) only: generating text needs a decoding loop with a key/value cache, "
                           "which one exported graph does not hold. Serve it with `tunelab serve` or load the "
                           "folder with transformers")
    if not t.predicts or t.head not in ("token-classification", "sequence-classification", "question-answering"):
        raise TunelabError(f"{model_dir}: a {t.kind} model ({t.head}); ONNX export covers encoder models with a "
                           "classification head (NER, classification, regression, multi-label, relation extraction): "
                           "a language model's predictions come from its vocabulary's scores over several forward "
                           "passes, not from one graph's logits. Serve it with `tunelab serve` or load the folder "
                           "with transformers")
    if t.describe().get("pairs"):
        raise TunelabError(f"{model_dir}: a model of text pairs ({t.kind}); ONNX export covers single-text encoder "
                           "models (NER, classification, regression, multi-label, relation extraction): its graph "
                           "takes input_ids and attention_mask only, not the token_type_ids that mark a pair's "
                           "second text. Serve it with `tunelab serve` or load the folder with transformers")
    if pred.meta.get("adapter") and pred.meta.get("tune") in ("prompt", "prefix"):
        raise TunelabError(f"{model_dir}: a {pred.meta['tune']}-tuning adapter cannot be merged into the weights, "
                           "so it has no plain model to export; train with tune.method lora, ia3 or full")
    if quantize:
        refuse_unsupported(t, "cpu")  # (the graph runs in onnxruntime on the CPU; the check needs an argmax task)
    model = pred.use(task=task)[1]
    plain = _plain_model(pred, model, task).to(pred.device)

    features = check_features(t, texts)
    if len(features) < 2:
        raise TunelabError("the parity check needs at least 2 inputs; give more texts with --check-data")
    # The reference: the logits tunelab predict computes with the folder's own model (adapters not merged).
    reference = feature_logits(model, features, t.pad, pred.device, batch_size=64)

    parent = output.parent if output.parent != Path("") else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=parent))
    try:
        path = tmp / "model.onnx"
        _export(plain, features[:2], t.pad, path, pred.device)
        import onnx

        onnx.checker.check_model(str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        parity = _parity(session, features, reference, t.pad, atol)
        if not parity["passed"]:
            raise TunelabError(
                f"ONNX parity check failed: max |onnxruntime - torch| = {parity['max_abs_diff']:.3g} over "
                f"{parity['features']} inputs, above the tolerance {atol:g}; nothing was written")
        quantized = _quantize(path, features, reference, t.pad, min_agreement, model_dir) if quantize else None
        plain.config.save_pretrained(str(tmp))
        t.tokenizer.save_pretrained(str(tmp))
        if getattr(model, "crf", None) is not None:  # (decoding needs its transitions: beside the graph)
            crf.save(model.crf, tmp)
        doc = {
            "task": t.kind, "labels": list(t.labels), "max_length": t.max_length,
            "inputs": {"input_ids": "int64 (batch, sequence)", "attention_mask": "int64 (batch, sequence)"},
            "outputs": {"logits": "float32 (batch, sequence, labels)" if t.token_level else
                        "float32 (batch, labels)"},
            "opset": OPSET, "parity": parity, "quantized": quantized,
            **({"crf": {"file": crf.FILE, "decode": "the logits at each word's first sub-token are emission scores: "
                        "the tags are the best path by Viterbi with transitions[previous, next], start and end "
                        "added, IOB2 moves only (no I-X first, I-X only after B-X or I-X)"}}
               if getattr(model, "crf", None) is not None else {}),
            "exported_from": {"folder": str(Path(model_dir).resolve()), "task": task,
                              "tune": pred.meta.get("tune")},
            "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__, "onnx": onnx.__version__},
        }
        (tmp / "onnx.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
        if output.is_dir():
            output.rmdir()  # empty (checked above)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return doc


def _onnxruntime():
    try:
        import onnx  # noqa: F401
        import onnxruntime
        import onnxscript  # noqa: F401  (the dynamo exporter writes through it)
    except ImportError as e:
        raise TunelabError(f"ONNX export needs the onnx extra ({e.name} is missing): "
                           "pip install -e '.[onnx]'") from None
    return onnxruntime


def _plain_model(pred, model, task):
    """The transformers model to export: a multi-task folder's task as a standalone model, an adapter merged
    into a copy of its base, or the model itself."""
    if pred.tasks:
        from tunelab.multitask.model import standalone

        return standalone(pred.model, task)
    if pred.meta.get("adapter"):
        return copy.deepcopy(model).merge_and_unload().eval()
    return model.eval()


class _Logits(torch.nn.Module):
    """(input_ids, attention_mask) -> logits: the graph's whole interface."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _export(model, features: list[dict], pad: int, path: Path, device) -> None:
    import logging
    import warnings

    from tunelab.data.batching import collate

    batch = collate(features, pad)
    args = (batch["input_ids"].to(device), batch["attention_mask"].to(device))
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30  # protobuf's 2 GB limit
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        torch.onnx.export(_Logits(model).eval(), args, str(path), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                          opset_version=OPSET, dynamo=True, external_data=big, verbose=False)


def _session_logits(session, features: list[dict], pad: int) -> tuple[list, list]:
    """onnxruntime's logits for every feature (trimmed to its real tokens: padding is not an output), run in
    batches of 1 and 3 (sizes and lengths the export example did not have); and the batch shapes."""
    from tunelab.data.batching import collate

    out, batches = [None] * len(features), []
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    groups = [order[:1]] + [order[k:k + 3] for k in range(1, len(order), 3)]
    for idx in groups:
        batch = collate([features[i] for i in idx], pad)
        (logits,) = session.run(["logits"], {"input_ids": batch["input_ids"].numpy(),
                                             "attention_mask": batch["attention_mask"].numpy()})
        batches.append(list(logits.shape))
        for row, i in enumerate(idx):
            out[i] = logits[row, : len(features[i]["input_ids"])] if logits.ndim == 3 else logits[row]
    return out, batches


def _parity(session, features: list[dict], reference: list, pad: int, atol: float) -> dict:
    """onnxruntime's logits for every feature against `reference`."""
    worst = 0.0
    logits, batches = _session_logits(session, features, pad)
    for got, ref in zip(logits, reference):
        diff = np.abs(got.astype(np.float64) - np.asarray(ref, dtype=np.float64))
        worst = max(worst, float(diff.max()) if np.isfinite(diff).all() else float("inf"))
    return {"passed": worst <= atol, "max_abs_diff": worst, "atol": atol, "features": len(features),
            "batch_shapes": batches}


def _quantize(path: Path, features: list[dict], reference: list, pad: int, min_agreement: float, model_dir) -> dict:
    """The float graph at `path` replaced by its int8 dynamic quantisation once that passes the agreement check
    against `reference` (PyTorch's float logits); the check's figures."""
    import logging

    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    int8 = path.with_name("model.int8.onnx")
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # (it logs a hint to pre-process the graph on the root logger)
    try:
        quantize_dynamic(str(path), str(int8), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    logits, _ = _session_logits(session, features, pad)
    doc = require_agreement(reference, logits, features, min_agreement, f"{model_dir}: int8 export")
    doc.update(kind="int8 dynamic (onnxruntime)", bytes=int8.stat().st_size, float_bytes=path.stat().st_size)
    os.replace(int8, path)
    return doc
