"""The one path from examples to predictions, shared by the training recipe's evaluation, `tunelab eval`,
`tunelab predict` and the server: encode -> length-sorted batches -> forward -> decode."""

import contextlib
import json
from pathlib import Path

import torch

from tunelab import progress
from tunelab.data.batching import collate, eval_batches
from tunelab.errors import TunelabError

META_FILE = "tunelab.json"


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TunelabError(f"train.device={name}: CUDA is not available on this machine; use cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


@torch.inference_mode()
def feature_logits(model, features: list[dict], pad_id: int, device, bf16=False, batch_size=64,
                   desc: str | None = None) -> list:
    """Logits per feature, as float32 numpy: (seq, labels) trimmed to the feature's length, or (labels,)."""
    was_training = model.training
    model.eval()
    out = [None] * len(features)
    batches = eval_batches([len(f["input_ids"]) for f in features], batch_size)
    for idx in progress.bar(iterable=batches, desc=desc, disable=desc is None, leave=False, unit="batch"):
        batch = collate([features[i] for i in idx], pad_id)
        with autocast(device, bf16):
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
        logits = logits.float().cpu().numpy()
        for row, i in enumerate(idx):
            out[i] = logits[row, : len(features[i]["input_ids"])] if logits.ndim == 3 else logits[row]
    model.train(was_training)
    return out


def predict(task, model, examples: list, device, bf16=False, batch_size=64, desc=None) -> list:
    features = task.encode(examples, training=False)
    pad_id = task.tokenizer.pad_token_id if task.tokenizer.pad_token_id is not None else 0
    logits = feature_logits(model, features, pad_id, device, bf16, batch_size, desc)
    return task.decode(features, logits, len(examples))


class Predictor:
    """A saved tunelab model folder, ready to predict."""

    def __init__(self, model_dir, device="auto", batch_size=64):
        from tunelab.models import load_tokenizer
        from tunelab.tasks import make_task

        self.dir = Path(model_dir)
        meta_path = self.dir / META_FILE
        if not meta_path.is_file():
            raise TunelabError(f"{self.dir}: not a tunelab model folder (no {META_FILE}); train one with "
                               "`tunelab train`")
        self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        self.device = pick_device(device)
        self.batch_size = batch_size
        tokenizer = load_tokenizer(self.dir)
        self.task = make_task(self.meta["task"], tokenizer, self.meta["labels"], self.meta["max_length"],
                              self.meta.get("context_sentences", 0))
        self.model = self._load_model().to(self.device).eval()

    def _load_model(self):
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        from tunelab.models import quiet_transformers

        quiet_transformers()
        cls = AutoModelForTokenClassification if self.meta["task"] == "ner" else AutoModelForSequenceClassification
        return cls.from_pretrained(str(self.dir), use_safetensors=True)

    def predict(self, examples: list, desc=None) -> list:
        return predict(self.task, self.model, examples, self.device, batch_size=self.batch_size, desc=desc)
