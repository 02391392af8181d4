"""One shared backbone, one head per task.

Each task's model is the ordinary transformers task model (BertForTokenClassification,
LlamaForSequenceClassification, LlamaForCausalLM, ...) whose backbone attribute (`bert`, `model`, ...) is set
to the same module object. So every task runs the library's own forward and loss, the backbone's parameters
exist once (the optimizer gets each once), and any one task can be exported as a plain transformers model.

Per-task LoRA adapters are peft adapters injected into the shared backbone, one per task name, switched with
`use(name)` before that task's forward.
"""

import torch

from tunelab.errors import TunelabError



class MultiTaskModel(torch.nn.Module):
    """`heads[name]` is the full task model for task `name`; `backbone` is shared by all of them."""

    def __init__(self, backbone, heads: dict):
        super().__init__()
        self.backbone = backbone  # registered first: the saved weights name the backbone's tensors backbone.*
        self.heads = torch.nn.ModuleDict(heads)
        self.adapters = False
        self.active = None

    def forward(self, task: str, **batch):
        self.use(task)
        return self.heads[task](**batch)

    def use(self, task: str):
        """Switch the per-task adapter (when there are adapters) and return the task's model."""
        if self.adapters and self.active != task:
            set_active_adapter(self.backbone, task)
            self.active = task
        return self.heads[task]


def build(path, tasks: dict, dropout=None, pretrained=True, trust_remote_code=False, pad_id=None,
          backbone_kind: str | None = None) -> MultiTaskModel:
    """`tasks`: name -> (kind, labels). Pretrained: the backbone's weights from `path` (heads new); else the
    architecture only, for loading a saved multi-task folder. `pad_id`: the tokenizer's, for configs that
    lack one (a decoder's sequence classifier finds each text's last token by it). `backbone_kind`: build the
    shared backbone as this task kind's model has it even if no head is of that kind yet (a continual run
    whose later experiences add such heads: BERT's pooler, which a sequence classifier needs)."""
    from transformers import AutoConfig

    from tunelab.models import load_model, quiet_transformers, set_dropout
    from tunelab.tasks import task_type

    quiet_transformers()
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if config.is_encoder_decoder:
        raise TunelabError(f"model {path}: multi-task training shares one encoder or decoder stack; "
                           f"encoder-decoder models ({config.model_type}) are not supported")
    if any(task_type(kind).decoder_only for kind, _ in tasks.values()) and not _is_decoder(config):
        raise TunelabError(f"model {path}: a generation task needs a decoder (causal LM) backbone, and "
                           f"{config.model_type} ({', '.join(config.architectures or ['?'])}) is an encoder; "
                           "use a causal LM such as SmolLM2-135M-Instruct, or drop the generation task")
    # Which task model donates its backbone (Task.donor_rank): a causal LM's head is tied to the backbone's
    # embeddings, and a sequence classifier's backbone may carry a pooler that a token classifier's lacks (BERT).
    order = sorted(tasks, key=lambda n: task_type(tasks[n][0]).donor_rank)
    specs = dict(tasks)
    if backbone_kind is not None and task_type(backbone_kind).donor_rank < task_type(tasks[order[0]][0]).donor_rank:
        order.insert(0, " donor")  # a model of that kind lends its backbone and is then dropped
        specs[" donor"] = (backbone_kind, ["a", "b"] if task_type(backbone_kind).new_head else [])
    heads = {}
    for name in order:
        kind, labels = specs[name]
        if pretrained:
            m = load_model(path, kind, labels, dropout, trust_remote_code)
        else:
            cfg = config.__class__.from_dict(config.to_dict())
            task_type(kind).configure(cfg, labels)
            set_dropout(cfg, dropout)
            m = task_type(kind).model_class(cfg).from_config(cfg)
        if m.config.pad_token_id is None and pad_id is not None:
            m.config.pad_token_id = pad_id
        heads[name] = m
    donor = heads[order[0]]
    backbone = getattr(donor, donor.base_model_prefix)
    for name in order[1:]:
        m = heads[name]
        own = getattr(m, m.base_model_prefix)
        if type(own) is not type(backbone):
            raise TunelabError(f"task {name}: its {type(m).__name__} expects a {type(own).__name__} backbone, "
                               f"not the shared {type(backbone).__name__}; this model type cannot share one "
                               "backbone between these heads")
        setattr(m, m.base_model_prefix, backbone)
        m.tie_weights()  # a causal LM head tied to the embeddings follows them to the shared backbone
    return MultiTaskModel(backbone, {n: heads[n] for n in tasks})


def _is_decoder(config) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (config.architectures or [])) and \
        config.model_type not in ("bert", "roberta", "xlm-roberta", "electra", "camembert")


def head_modules(model: MultiTaskModel) -> set[str]:
    """Top-level module names inside each task model that are its own head (not the shared backbone)."""
    return {n for m in model.heads.values() for n, _ in m.named_children() if n != m.base_model_prefix}


def add_adapters(model: MultiTaskModel, names, r: int, alpha: float, dropout: float, targets) -> None:
    """One LoRA adapter per task name in the shared backbone (peft), all trainable; the backbone frozen."""
    import peft

    from tunelab.peft import check_targets

    backbone = model.backbone
    targets = list(targets or peft.utils.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(
        backbone.config.model_type) or [])
    if not targets:
        raise TunelabError(f"tune.target_modules: peft has no default for model type "
                           f"{backbone.config.model_type!r}; name them")
    if targets != ["all-linear"]:
        check_targets(backbone, targets, set())
    for p in backbone.parameters():
        p.requires_grad = False
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules="all-linear" if targets == ["all-linear"] else targets)
    import warnings

    with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for name in names:
            peft.inject_adapter_in_model(config, backbone, adapter_name=name)
    for n, p in backbone.named_parameters():
        if ".lora_" in n:
            p.requires_grad = True
    from tunelab.peft import keep_input_dtype

    keep_input_dtype(backbone)
    model.adapters = True
    model.active = None


def set_active_adapter(backbone, name: str) -> None:
    """Route the LoRA layers through `name`'s adapter. peft's set_adapter also freezes the other adapters'
    weights; tunelab trains all of them (each on its own task's batches), so their requires_grad is kept."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in backbone.modules():
        if isinstance(module, BaseTunerLayer):
            flags = [(p, p.requires_grad) for p in module.parameters()]
            module.set_adapter(name)
            for p, flag in flags:
                p.requires_grad = flag


def state(model: MultiTaskModel) -> dict:
    """Every tensor once (the shared backbone under backbone.*, each head under heads.NAME.*): what the
    multi-task folder saves. Tied weights are kept once and re-tied on load."""
    from tunelab.peft import trainable_state

    return {k: v.contiguous().cpu() for k, v in trainable_state(model, frozen_too=True).items()}


def load_state(model: MultiTaskModel, weights: dict, path) -> None:
    result = model.load_state_dict(weights, strict=False)
    expected = set(state(model))
    missing = expected - set(weights)
    if result.unexpected_keys or missing:
        raise TunelabError(f"{path}: the weights do not fit the multi-task model described by its "
                           f"tunelab.json (unexpected {result.unexpected_keys[:3]}, missing {sorted(missing)[:3]})")


def standalone(model: MultiTaskModel, task: str):
    """Task `task` as a plain transformers model of its own (a copy); its adapter, if any, merged in. Parts
    of the shared backbone that this head does not use (BERT's pooler under a token classifier) are left
    out, as the task's own transformers class has none."""
    import copy

    m = copy.deepcopy(model.heads[task])
    if model.adapters:
        from peft.tuners.lora import LoraLayer

        backbone = getattr(m, m.base_model_prefix)
        set_active_adapter(backbone, task)
        for module in backbone.modules():
            if isinstance(module, LoraLayer):
                module.merge(adapter_names=[task])
    weights = {k.replace(".base_layer.", "."): v for k, v in m.state_dict().items() if ".lora_" not in k}
    plain = type(m)(m.config)
    expected = plain.state_dict()
    missing = set(expected) - set(weights)
    if missing:
        raise TunelabError(f"task {task}: cannot export, the weights for {sorted(missing)[:3]} are missing")
    plain.load_state_dict({k: v for k, v in weights.items() if k in expected})
    plain.tie_weights()
    return plain.eval()


def load(folder, meta: dict) -> MultiTaskModel:
    """A saved multi-task folder (tunelab.json + model.safetensors) as a MultiTaskModel."""
    from pathlib import Path

    from safetensors.torch import load_file

    from tunelab.models import require_weights

    folder = Path(folder)
    require_weights(folder)
    specs = {n: (t["task"], t["labels"]) for n, t in meta["tasks"].items()}
    model = build(folder, specs, pretrained=False, backbone_kind=meta.get("backbone_kind"))
    if meta.get("adapters"):
        a = meta["adapters"]
        add_adapters(model, list(specs), a["r"], a["alpha"], 0.0, a["target_modules"])
    load_state(model, load_file(str(folder / "model.safetensors")), folder / "model.safetensors")
    return model


def export(folder, meta: dict, task: str, output) -> None:
    """Write task `task` of a multi-task folder to `output` as a standalone model folder: plain transformers
    weights and config (with id2label), the tokenizer, and tunelab.json for tunelab predict/eval."""
    from pathlib import Path

    from tunelab.models import load_tokenizer
    from tunelab.train.run import publish

    output = Path(output)
    if task not in meta["tasks"]:
        raise TunelabError(f"{folder} holds tasks {', '.join(meta['tasks'])}, not {task!r}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise TunelabError(f"{output} already exists and is not an empty folder; choose a new output folder")
    plain = standalone(load(folder, meta), task)
    tokenizer = load_tokenizer(folder)
    own = {k: v for k, v in meta["tasks"][task].items()}
    own.update(base_model=meta["base_model"], tune="full", tunelab_format=1,
               exported_from={"folder": str(Path(folder).resolve()), "task": task, "tune": meta["tune"]})

    def write(tmp: Path) -> None:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))

    publish(output, write, own)
