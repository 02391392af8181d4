"""Backbone loading: a packaged model name or a local folder, with a task head, safetensors only."""

import logging
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models.files import (PACKAGED, PICKLES, load_tokenizer, quiet_transformers,  # noqa: F401 (public names)
                                  require_weights, resolve_model_path)

DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                "resid_pdrop", "embd_pdrop", "attn_pdrop")


def unk_share(features, tokenizer) -> float:
    """The share of the features' tokens the tokenizer could not read ([UNK]); 0 for tokenizers without one."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0.0
    total = sum(len(f["input_ids"]) for f in features)
    return sum(t == unk for f in features for t in f["input_ids"]) / max(1, total)


def check_coverage(features, tokenizer, model_name, max_share, warn=None) -> None:
    """A tokenizer whose vocabulary lacks the data's script turns it into [UNK]: training would 'work' and
    learn next to nothing. Say so before spending the compute (`warn(message)` for a large, allowed share)."""
    share = unk_share(features, tokenizer)
    if share > max_share:
        raise TunelabError(f"model {model_name}: its tokenizer reads {share:.0%} of the training tokens as "
                           f"{tokenizer.unk_token} (limit model.max_unk_share={max_share}); it cannot read this "
                           "data. Use a model whose vocabulary covers the text's script (model.name=FOLDER), or "
                           "set model.max_unk_share=1 to train anyway")
    if share > UNK_WARNING and warn is not None:
        warn(f"warning: {share:.1%} of the training tokens are {tokenizer.unk_token} for this tokenizer")


UNK_WARNING = 0.05  # above this share of [UNK] tokens, training and prediction say so


def model_class(task: str, config):
    """The transformers Auto class for a task of kind `task` on a backbone with this config."""
    from tunelab.tasks import task_type

    return task_type(task).model_class(config)


def set_dropout(config, dropout) -> None:
    """model.dropout: the backbone's hidden and attention dropout (when not None)."""
    if dropout is None:
        return
    hit = [k for k in DROPOUT_KEYS if hasattr(config, k)]
    if not hit:
        raise TunelabError(f"model.dropout: the {config.model_type} config has none of {', '.join(DROPOUT_KEYS)}")
    for k in hit:
        setattr(config, k, dropout)


def recompute_activations(model) -> None:
    """Activation (gradient) checkpointing: each layer's activations are recomputed in backward instead of
    kept from forward (train.gradient_checkpointing). Non-reentrant, so that it works with frozen inputs
    (peft adapters) and with bf16 autocast."""
    from tunelab.peft import base_of

    base = base_of(model)
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise TunelabError(f"train.gradient_checkpointing: transformers' {type(base).__name__} does not support "
                           "activation checkpointing; remove the key")
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def load_model(path, task: str, labels: list[str], dropout=None, trust_remote_code=False):
    """A token- or sequence-classification model with `labels` as its id2label, or a generation model
    (causal LM or encoder-decoder), from safetensors weights. A folder whose trained head has the first labels
    of `labels` (continued training on data with more labels: tunelab.data.check_labels puts the saved ones
    first) keeps that head, widened by rows for the new labels."""
    from transformers import AutoConfig

    from tunelab.tasks import task_type

    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    kind = task_type(task)
    saved_labels = _labels(config) if _has_label_head(config) else None
    widen = kind.new_head and saved_labels is not None and len(labels) > len(saved_labels) and \
        list(labels[:len(saved_labels)]) == saved_labels
    kind.configure(config, saved_labels if widen else labels)
    set_dropout(config, dropout)
    cls = kind.model_class(config)
    if type(config) not in cls._model_mapping:
        raise TunelabError(f"model {path}: transformers has no {kind.head} head for model type {config.model_type!r}, "
                           f"so it cannot be used for task={task}; choose another model")
    require_weights(path)
    # A folder fine-tuned on other labels (another label set, another count): its head cannot serve these
    # labels, so a new one is initialised, and the user is told (transformers would raise on the shape).
    fresh_head = kind.new_head and saved_labels is not None and saved_labels != list(labels) and not widen
    if fresh_head:
        logging.getLogger("tunelab.models").warning(
            f"model {path}: its head was trained for the labels {', '.join(saved_labels[:8])}"
            f"{' ...' if len(saved_labels) > 8 else ''}, not these {len(labels)}; the backbone is kept and the head "
            "starts anew")
    quiet_transformers()
    model, info = cls.from_pretrained(str(path), config=config, use_safetensors=True,
                                      trust_remote_code=trust_remote_code, ignore_mismatched_sizes=fresh_head,
                                      output_loading_info=True)
    missing = sorted(info.get("missing_keys") or [])
    if missing and not kind.new_head:  # e.g. a sentence encoder without its MLM head, continuing pre-training
        logging.getLogger("tunelab.models").warning(
            f"model {path}: {len(missing)} weights of its {kind.head} head are not in the folder ({missing[0]}"
            f"{', ...' if len(missing) > 1 else ''}); they start from transformers' initialisation")
    if fresh_head:  # (a head of the same size loaded its old rows, now meaning other labels: start it anew too)
        import torch

        from tunelab.peft import head_names

        std = getattr(model.config, "initializer_range", 0.02)  # as transformers initialises a new head
        for name in head_names(model, task):
            for m in model.get_submodule(name).modules():
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.normal_(m.weight, std=std)
                    if m.bias is not None:
                        torch.nn.init.zeros_(m.bias)
    if widen:
        widen_head(model, task, labels)
    return model


def head_labels(path, task: str) -> list[str] | None:
    """The labels of the trained head that a model folder holds for a task of kind `task` (a folder
    fine-tuned by tunelab or transformers), or None: a bare backbone, or a head of another kind."""
    from transformers import AutoConfig

    from tunelab.tasks import task_type

    kind = task_type(task)
    config = AutoConfig.from_pretrained(str(path))
    suffix = "For" + "".join(w.capitalize() for w in kind.head.split("-"))  # ForTokenClassification
    if not kind.new_head or not any(a.endswith(suffix) for a in (config.architectures or [])):
        return None
    return _labels(config)


def _labels(config) -> list[str]:
    return [config.id2label[i] for i in sorted(config.id2label)]


def widen_head(model, task: str, labels: list[str], generator=None) -> None:
    """Give a trained classification head rows for the labels after its own (`labels` starts with the
    head's labels): the output layer's old rows are kept exactly, so the old labels' logits do not change;
    the new rows start as transformers starts a new head (normal, std initializer_range; bias 0)."""
    import torch

    from tunelab.peft import head_names
    from tunelab.tasks import task_type

    old = model.config.num_labels
    if [model.config.id2label[i] for i in range(old)] != list(labels[:old]):
        raise TunelabError(f"the head's labels {list(model.config.id2label.values())} are not the first of "
                           f"{labels}; a widened head keeps its labels in their places")
    layers = [(name, m) for head in sorted(head_names(model, task))
              for name, m in model.get_submodule(head).named_modules(prefix=head)
              if isinstance(m, torch.nn.Linear) and m.out_features == old]
    if not layers:
        raise TunelabError(f"{type(model).__name__}: no output layer of {old} labels found in its head to widen")
    name, layer = layers[-1]  # the output projection (RoBERTa's head has a dense layer before it)
    new = torch.nn.Linear(layer.in_features, len(labels), bias=layer.bias is not None,
                          device=layer.weight.device, dtype=layer.weight.dtype)
    with torch.no_grad():
        std = getattr(model.config, "initializer_range", 0.02)
        new.weight.normal_(0.0, std, generator=generator)
        new.weight[:old] = layer.weight
        if layer.bias is not None:
            new.bias.zero_()
            new.bias[:old] = layer.bias
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
    task_type(task).configure(model.config, list(labels))
    for m in model.modules():  # transformers task models copy num_labels at init and reshape logits by it
        if hasattr(m, "num_labels") and m.num_labels == old:
            m.num_labels = len(labels)


def continue_adapter(folder, meta: dict, task: str, labels: list[str], tune, dropout=None):
    """The model to train when model.name is a tunelab adapter folder (continued training on new data):
    its base model with the adapter loaded trainable. tune.method the folder's own: the same adapter trains on
    (its labels must be the data's: a head inside an adapter is not widened). tune.method=full: the adapter
    is merged into the base, the head widened for new labels, and the whole model trains. Returns
    (model, already_tuned): the first case is ready as it is; the second still goes through `apply`."""
    from peft import PeftModel

    from tunelab.peft import keep_input_dtype

    if meta.get("task") != task:
        raise TunelabError(f"model.name={folder} is an adapter for task {meta.get('task')}, not {task}")
    same = tune.method == meta.get("tune")
    if not same and tune.method != "full":
        raise TunelabError(f"model.name={folder} is a {meta.get('tune')} adapter: continue it with "
                           f"tune.method={meta.get('tune')}, or merge it and train the whole model with "
                           "tune.method=full")
    saved = list(meta.get("labels") or [])
    if same and saved and list(labels) != saved:
        raise TunelabError(f"model.name={folder}: the data adds labels ({', '.join(x for x in labels if x not in saved)}) "
                           "to the adapter's; an adapter's head is not widened: train with tune.method=full (the "
                           "adapter is merged and the head widened), or keep to the adapter's labels")
    base = load_model(resolve_model_path(meta["base_model"]), task, saved or labels, dropout)
    model = PeftModel.from_pretrained(base, str(folder), is_trainable=same)
    if same:
        if tune.method == "lora":
            keep_input_dtype(model)
        return model, True
    merged = model.merge_and_unload()
    if saved and list(labels) != saved:
        widen_head(merged, task, labels)
    return merged, False


def _has_label_head(config) -> bool:
    """The folder holds a trained classification head (not a bare backbone whose config has default labels)."""
    return any(a.endswith(("ForTokenClassification", "ForSequenceClassification"))
               for a in (config.architectures or []))


def build_bert2bert(encoder, out) -> Path:
    """An encoder-decoder ("bert2bert", Rothe et al., 2020) warm-started from one BERT-style encoder (a
    packaged name or a folder) as both encoder and decoder; the decoder's cross-attention is new and learns in
    fine-tuning. Saved with the encoder's tokenizer to `out` (safetensors), ready for task: generate or rl
    (model.name=OUT). [CLS] starts a decoded text and [SEP] ends it."""
    from transformers import EncoderDecoderModel

    path = resolve_model_path(str(encoder))
    tok = load_tokenizer(path)
    if tok.cls_token_id is None or tok.sep_token_id is None:
        raise TunelabError(f"{encoder}: bert2bert needs a tokenizer with [CLS] and [SEP] tokens (a BERT-style "
                           "encoder)")
    quiet_transformers()
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(str(path), str(path))
    model.config.decoder_start_token_id = tok.cls_token_id
    model.config.eos_token_id = tok.sep_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.decoder_start_token_id = tok.cls_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out = Path(out)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
