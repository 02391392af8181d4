"""How much of the model trains: peft adapters (LoRA, IA3, prompt and prefix tuning), BitFit, head-only, and
freezing of the embeddings or the lowest layers.

`apply(model, tune, task)` takes a transformers task model and returns the model to train (a peft
`PeftModel` for the adapter methods), with `requires_grad` set so that exactly the chosen parameters change.
A new task head (token or sequence classification) always trains and is always saved: peft keeps a trainable
copy of it (`modules_to_save`) inside the adapter, so the adapter folder alone restores the whole model. A
generation model's LM head is pretrained, not new, and trains only under `full`.

The import name shadows nothing: inside tunelab, `import peft` is the peft library (absolute imports).
"""

import torch

from tunelab.errors import TunelabError

from tunelab.config import ADAPTERS  # the methods that train an adapter; one list, beside tune.method's choices


def head_names(model, task: str) -> set[str]:
    """Top-level modules of a transformers task model that are the freshly initialised head."""
    from tunelab.tasks import task_type

    if not task_type(task).new_head:
        return set()
    prefix = model.base_model_prefix
    return {n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())}


def is_head(name: str, heads: set[str]) -> bool:
    return any(part in heads for part in name.split("."))


def base_of(model):
    """The transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def apply(model, tune, task: str, model_path=None):
    """The model to train for config section `tune` (TuneConfig), with exactly its parameters trainable."""
    heads = head_names(model, task)
    if tune.lora_embeddings and tune.freeze_embeddings:
        raise TunelabError("tune.lora_embeddings and tune.freeze_embeddings contradict each other; set one")
    if tune.lora_embeddings and tune.method != "lora":
        raise TunelabError(f"tune.lora_embeddings needs tune.method=lora, not {tune.method}")
    if tune.method in ADAPTERS:
        model = _with_adapter(model, tune, task, heads, model_path)
    elif tune.method in ("bitfit", "head"):
        for name, p in model.named_parameters():
            # BitFit (Ben Zaken et al., 2022): only the bias terms, plus the new head.
            p.requires_grad = is_head(name, heads) or (tune.method == "bitfit" and name.endswith(".bias"))
        if tune.method == "bitfit" and not any(p.requires_grad for n, p in model.named_parameters()
                                               if not is_head(n, heads)):
            raise TunelabError(f"tune.method=bitfit: the {model.config.model_type} backbone has no bias terms "
                               "to train; choose lora or ia3")
    freeze(base_of(model), tune.freeze_embeddings, tune.freeze_layers)
    return model


def _with_adapter(model, tune, task, heads, model_path):
    import peft

    from tunelab.tasks import task_type

    kind = task_type(task).peft_type(model.config)
    save = sorted(heads) or None
    if tune.method in ("lora", "ia3"):
        defaults = (peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING if tune.method == "lora" else
                    peft.utils.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)
        targets = list(tune.target_modules or defaults.get(model.config.model_type) or [])
        if not targets:
            raise TunelabError(f"tune.target_modules: peft has no default for model type "
                               f"{model.config.model_type!r}; name them. {_layer_names(model, heads)}")
        if targets == ["all-linear"]:
            targets = "all-linear"  # peft's own shorthand: every linear layer but the output head
        else:
            check_targets(model, targets, heads)
        if tune.method == "lora":
            if tune.lora_embeddings:
                if isinstance(targets, str):
                    raise TunelabError("tune.lora_embeddings with target_modules=[all-linear]: name the "
                                       "linear targets instead")
                targets.append(_qualified(model, model.get_input_embeddings()).rsplit(".", 1)[-1])
            config = peft.LoraConfig(task_type=kind, r=tune.lora_r, lora_alpha=tune.lora_alpha,
                                     lora_dropout=tune.lora_dropout, target_modules=targets, modules_to_save=save)
        else:
            # IA3 scales a feed-forward layer's input rather than its output; peft must be told which those are.
            ff_known = peft.utils.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model.config.model_type, [])
            ff = [t for t in targets if t in ff_known] if isinstance(targets, list) else []
            config = peft.IA3Config(task_type=kind, target_modules=targets, feedforward_modules=ff,
                                    modules_to_save=save)
    elif tune.method == "prompt":
        init = {}
        if tune.prompt_init_text:
            init = {"prompt_tuning_init": peft.PromptTuningInit.TEXT, "prompt_tuning_init_text": tune.prompt_init_text,
                    "tokenizer_name_or_path": str(model_path)}
        config = peft.PromptTuningConfig(task_type=kind, num_virtual_tokens=tune.virtual_tokens, **init)
    else:
        config = peft.PrefixTuningConfig(task_type=kind, num_virtual_tokens=tune.virtual_tokens)
    wrapped = peft.get_peft_model(model, config)
    trained = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    missing = [h for h in sorted(heads) if not any(h in n.split(".") for n in trained)]
    if missing:  # peft wraps heads named classifier/score itself; modules_to_save covers the rest for lora/ia3
        raise TunelabError(f"tune.method={tune.method}: peft would leave the task head {', '.join(missing)} of "
                           f"{type(model).__name__} untrained; use lora, ia3 or full")
    if tune.method == "lora":
        keep_input_dtype(wrapped)
    if tune.method == "prefix":
        _check_prefix(wrapped, model.config.model_type)
    if tune.method == "prompt" and task_type(task).token_level:
        shift_token_outputs(wrapped, tune.virtual_tokens)
    return wrapped


def keep_input_dtype(model) -> None:
    """peft's LoRA layers cast their input to the adapter's dtype (float32) before the adapter. Under bf16
    autocast the adapter's matmul casts it straight back to bf16: skipping the round trip saves two copies of
    every adapted layer's input per step and gives bit-identical results without LoRA dropout (tested; with
    dropout, the dropout's rescaling is rounded to bf16 one step earlier). On CoNLL with LoRA on every linear
    layer, training time went from 1.04x to 0.99x full fine-tuning's, one run each; peak memory did not change.
    Without autocast the input is already float32 and nothing changes."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = False


def _check_prefix(wrapped, model_type):
    """peft implements prefix tuning through past_key_values, which encoder-only models no longer take."""
    ids = torch.tensor([[0, 1]], device=next(wrapped.parameters()).device)
    try:
        with torch.no_grad():
            wrapped(input_ids=ids, attention_mask=torch.ones_like(ids))
    except ValueError as e:
        if "past key values" in str(e):
            raise TunelabError(f"tune.method=prefix: peft's prefix tuning needs a model that takes "
                               f"past_key_values, and {model_type} does not; use prompt, lora or ia3") from None
        raise


def shift_token_outputs(model, n: int) -> None:
    """peft's prompt tuning prepends n virtual tokens to the input of a token classifier but neither to its
    labels nor away from its logits (peft 0.21). Pad the labels and drop those n positions, so that every
    consumer sees one logit row per real token."""

    def pre(module, args, kwargs):
        labels = kwargs.get("labels")
        if labels is not None:
            kwargs["labels"] = torch.cat([labels.new_full((labels.shape[0], n), -100), labels], dim=1)
        for key in ("start_positions", "end_positions"):  # extractive QA: answer positions move with the tokens
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + n
        return args, kwargs

    def post(module, args, kwargs, output):
        for key in ("logits", "start_logits", "end_logits"):
            if key in output:
                output[key] = output[key][:, n:]
        return output

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


def check_targets(model, targets: list[str], heads: set[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            raise TunelabError(f"tune.target_modules: {t!r} matches no module of this {model.config.model_type} "
                               f"model. {_layer_names(model, heads)}")


def _layer_names(model, heads) -> str:
    from transformers.pytorch_utils import Conv1D

    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, Conv1D)) and not is_head(n, heads)})
    return f"Its layers (targets may be any of these, or a dotted suffix such as attention.output.dense): " \
           f"{', '.join(leaves)}"


def _qualified(root, module) -> str:
    for name, m in root.named_modules():
        if m is module:
            return name
    raise ValueError("module not found")


def layer_list(model):
    """The model's list of transformer blocks (the encoder's, for an encoder-decoder)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "num_layers", None)
    for _, m in model.named_modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    raise TunelabError(f"tune.freeze_layers: cannot find the layer list of this {model.config.model_type} model")


def freeze(model, embeddings: bool, layers: int) -> None:
    if embeddings:
        emb = model.get_input_embeddings()
        name = _qualified(model, emb)
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        # BERT-style models keep word, position and type embeddings with their LayerNorm in one module.
        module = model.get_submodule(parent) if parent.endswith("embeddings") else emb
        for p in module.parameters():
            p.requires_grad = False
    if layers:
        blocks = layer_list(model)
        if layers > len(blocks):
            raise TunelabError(f"tune.freeze_layers={layers}, but the model has {len(blocks)} layers")
        for block in blocks[:layers]:
            for p in block.parameters():
                p.requires_grad = False


def count(model) -> tuple[int, int]:
    """(trainable, total) parameters; tied weights count once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def describe(trainable: int, total: int) -> str:
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(1, total):.3g} %)"


def trainable_state(model, frozen_too: bool = False) -> dict:
    """What training changes: the trainable parameters and the (persistent) buffers, each tensor once even
    where weights are tied or modules shared (under its first name). The frozen rest is the pretrained model,
    reloaded from its folder on resume; `frozen_too` includes it (a complete, deduplicated state)."""
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or (not frozen_too and isinstance(t, torch.nn.Parameter) and not t.requires_grad):
            continue
        seen.add(id(t))
        out[name] = t.detach()
    return out
