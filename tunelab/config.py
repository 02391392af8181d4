"""The run schema: dataclasses with defaults, filled from YAML, overridden by `key.sub=value` arguments.

Unknown keys and wrong types are errors naming the key. The resolved config is saved beside every model.
"""

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.errors import TunelabError


@dataclass
class ModelConfig:
    name: str = "all-MiniLM-L6-v2"  # a packaged model name (tunelab.models.PACKAGED) or a local folder
    max_length: int = 256  # sub-word tokens per sequence, [CLS]/[SEP] included
    dropout: float | None = None  # overrides the backbone's hidden/attention dropout when set
    trust_remote_code: bool = False
    max_unk_share: float = 0.3  # refuse data whose tokens the tokenizer mostly cannot read ([UNK])


@dataclass
class DataConfig:
    # a built-in set (conll2003, msra, bbc_news, chn_sentiment, rt_sentiment, bbc_headlines); unset: the files below
    dataset: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    format: str | None = None  # conll | jsonl | csv; from the file extension when unset
    text_field: str = "text"
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    prompt_field: str = "prompt"  # generation: JSONL/CSV field of the input
    target_field: str = "target"  # generation: JSONL/CSV field of the reference output
    prompt_suffix: str = "\n"  # generation with a causal LM: put between the prompt and the output it learns
    max_target_length: int = 64  # generation: reference tokens kept in training; new tokens at prediction
    tag_column: int = -1
    tag_scheme: str = "iob2"  # scheme of the input files; converted to IOB2
    context_sentences: int = 0  # NER: up to this many neighbouring sentences of the same document as context
    max_train_examples: int | None = None  # first N training examples (quick runs)
    max_eval_examples: int | None = None  # first N dev examples


@dataclass
class TrainConfig:
    epochs: float = 3.0
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 5e-5
    head_lr: float | None = None  # the new task head often wants a larger rate; None = lr
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_ratio: float = 0.1
    scheduler: str = "linear"  # linear | cosine | constant
    max_grad_norm: float | None = 1.0
    group_by_length: bool = True
    seed: int = 42
    bf16: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = 0  # steps between dev evaluations; 0 = once per epoch
    save_every: int = 0  # steps between resumable checkpoints; 0 = at each evaluation and every save_minutes
    save_minutes: float = 5.0  # at most this much work is lost to a crash (when save_every is 0)
    patience: int | None = None  # stop after this many evaluations without dev improvement
    threads: int | None = None  # torch CPU threads; None = torch's default


@dataclass
class TuneConfig:
    """Which parameters train. A new task head (classification) always trains; everything else per method."""
    method: str = "full"  # full | lora | ia3 | prompt | prefix | bitfit | head
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None  # LoRA/IA3 targets (module name suffixes); None = peft's default
    lora_embeddings: bool = False  # LoRA on the input embeddings too
    virtual_tokens: int = 20  # prompt / prefix tuning
    prompt_init_text: str | None = None  # prompt tuning: start from this text's embeddings instead of random
    freeze_embeddings: bool = False  # keep the embedding layer fixed (any method)
    freeze_layers: int = 0  # keep the lowest N transformer layers fixed (any method)
    merge: bool = False  # lora/ia3: also save the merged full model in OUTPUT_DIR/merged


@dataclass
class TaskSpec:
    """One task of a multi-task run (`tasks: {NAME: ...}`): its head type, data and loss weight."""
    task: str = "classify"  # ner | classify | generate
    data: DataConfig = field(default_factory=DataConfig)
    weight: float = 1.0  # multitask.weighting=fixed: this task's loss is multiplied by it
    max_length: int | None = None  # sub-word tokens per sequence for this task; None = model.max_length


@dataclass
class MultiTaskConfig:
    """How the tasks of a multi-task run share the steps and the loss (task: multitask)."""
    sampling: str = "temperature"  # proportional | temperature | round_robin | annealed
    temperature: float = 2.0  # sampling=temperature: task probability proportional to size^(1/T)
    anneal_min: float = 0.2  # sampling=annealed: the exponent on size falls from 1 to this over training
    mix: str = "one"  # one: each micro-batch is one task's | all: each step takes one batch of every task
    # fixed (tasks.NAME.weight) | uncertainty (learned per-task log-variances, trained at train.head_lr or
    # train.lr) | pcgrad (projects conflicting task gradients; needs mix=all)
    weighting: str = "fixed"
    select: str = "mean"  # model selection and early stopping: mean of the task scores, or one task's name
    train_backbone: bool = False  # tune.method=lora (per-task adapters): also train the shared backbone


@dataclass
class TrackConfig:
    """Experiment tracking (tunelab.track): where each run's scalars go besides report.json."""
    tensorboard: bool = True  # event files in OUTPUT_DIR/tensorboard
    mlflow: bool = False  # needs the `track` extra (mlflow-skinny)
    mlflow_uri: str | None = None  # tracking URI; None = file store in OUTPUT_DIR/mlruns (works offline)
    experiment: str | None = None  # MLflow experiment name; None = "tunelab"


@dataclass
class RLConfig:
    """Policy-gradient fine-tuning of a generator (task: rl). The `train` section configures the optional
    supervised warm start (`sft`) and what both phases share (seed, bf16, device, threads, max_grad_norm)."""
    sft: bool = False  # first fine-tune on the references (train.* settings), then start RL from that model
    estimator: str = "rloo"  # reinforce | rloo | self_critical | ppo
    steps: int = 100  # rollouts (each followed by ppo_epochs updates for ppo, one update otherwise)
    lr: float = 1e-5
    warmup_steps: int = 0
    prompts_per_step: int = 8
    samples_per_prompt: int = 4  # k completions per prompt, from one generate call
    micro_batch: int = 16  # completions per forward/backward (gradients accumulate over a rollout)
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 24
    baseline_decay: float = 0.9  # reinforce: moving-average baseline of the mean reward
    ppo_epochs: int = 4  # ppo: passes over each rollout
    clip: float = 0.2  # ppo: ratio clipped to [1 - clip, 1 + clip]
    kl_coef: float = 0.05  # reward -= kl_coef * sum_t (log pi - log ref)
    kl_target: float | None = None  # adaptive coefficient (Ziegler et al.) towards this KL per completion
    kl_horizon: int = 10000
    entropy_coef: float = 0.0  # loss -= entropy_coef * mean token entropy
    whiten: bool = False  # rewards (after the KL penalty) to zero mean, unit std per rollout
    # reward name -> weight: bleu, rouge_l, classifier, length, repetition, or a function "module:function"
    rewards: dict[str, float] = field(default_factory=dict)
    classifier: str | None = None  # rewards.classifier: a tunelab classification folder
    classifier_label: str | None = None  # ... and the label whose probability is the reward
    classifier_input: str = "completion"  # completion | full (prompt + completion)
    target_words: int = 10  # rewards.length: the length without penalty
    eval_every: int = 0  # rollouts between held-out evaluations; 0 = before and after only
    eval_prompts: int = 64  # held-out prompts (dev split) per evaluation
    save_every: int = 10  # rollouts between resumable checkpoints


@dataclass
class RunConfig:
    task: str = "ner"  # ner | classify | generate | multitask | rl
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)  # task: multitask
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # task: rl
    track: TrackConfig = field(default_factory=TrackConfig)


TASKS = ("ner", "classify", "generate")
METHODS = ("full", "lora", "ia3", "prompt", "prefix", "bitfit", "head")
MULTITASK_METHODS = ("full", "lora", "bitfit", "head")  # lora: one adapter per task on the shared backbone
CHOICES = {"task": TASKS + ("multitask", "rl"), "tune.method": METHODS, "train.scheduler": ("linear", "cosine", "constant"),
           "data.format": (None, "conll", "jsonl", "csv"),
           "data.tag_scheme": ("iob2", "iob1", "bioes", "bilou", "bmes"),
           "multitask.sampling": ("proportional", "temperature", "round_robin", "annealed"),
           "multitask.mix": ("one", "all"), "multitask.weighting": ("fixed", "uncertainty", "pcgrad"),
           "rl.estimator": ("reinforce", "rloo", "self_critical", "ppo"), "rl.classifier_input": ("completion", "full")}


def _coerce(value, tp, key: str):
    """Check `value` against the annotation `tp`; YAML ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except TunelabError:
                pass
        raise TunelabError(f"config key {key!r}: expected {_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not value:
            raise TunelabError(f"config key {key!r}: expected a non-empty list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, key) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-4" (no dot) as a string; a float is plainly meant.
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise TunelabError(f"config key {key!r}: expected {_name(tp)}, got {value!r}")
    return value


def _name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _fill(obj, values: dict, prefix: str, source: str):
    if not isinstance(values, dict):
        raise TunelabError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = prefix + str(k)
        if k not in names:
            raise TunelabError(f"{source}: unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if typing.get_origin(hints[k]) is dict:  # named sub-sections (tasks: {NAME: {...}}) or values
            if not isinstance(v, dict):  # (empty in a saved single-task config.yaml)
                raise TunelabError(f"{source}: {key} must be a mapping of names to sections, got {v!r}")
            item = typing.get_args(hints[k])[1]
            if not dataclasses.is_dataclass(item):  # name -> value (rl.rewards: {rouge_l: 1.0})
                for name, sub in v.items():
                    current[str(name)] = _coerce(sub, item, f"{key}.{name}")
                continue
            for name, sub in v.items():
                if not isinstance(name, str) or not name.isidentifier():
                    raise TunelabError(f"{source}: {key}: name {name!r} must be a plain identifier (letters, "
                                       "digits, _)")
                _fill(current.setdefault(name, item()), sub, f"{key}.{name}.", source)
        elif dataclasses.is_dataclass(current):
            _fill(current, v, key + ".", source)
        else:
            setattr(obj, k, _coerce(v, hints[k], key))


def _validate(cfg: RunConfig):
    for key, allowed in CHOICES.items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value not in allowed:
            raise TunelabError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, allowed))}")
    t = cfg.train
    checks = [("train.epochs", t.epochs > 0), ("train.batch_size", t.batch_size > 0),
              ("train.grad_accum", t.grad_accum > 0), ("train.lr", t.lr > 0),
              ("train.warmup_ratio", 0 <= t.warmup_ratio < 1), ("model.max_length", cfg.model.max_length >= 8),
              ("data.context_sentences", cfg.data.context_sentences >= 0),
              ("data.max_target_length", cfg.data.max_target_length > 0), ("tune.lora_r", cfg.tune.lora_r > 0),
              ("tune.lora_dropout", 0 <= cfg.tune.lora_dropout < 1),
              ("tune.virtual_tokens", cfg.tune.virtual_tokens > 0), ("tune.freeze_layers", cfg.tune.freeze_layers >= 0)]
    for key, ok in checks:
        if not ok:
            value = cfg
            for part in key.split("."):
                value = getattr(value, part)
            raise TunelabError(f"config key {key!r}: {value!r} is out of range")
    if cfg.tune.merge and cfg.tune.method not in ("lora", "ia3"):
        raise TunelabError(f"config key 'tune.merge': only lora and ia3 adapters merge into the weights, not "
                           f"tune.method={cfg.tune.method} (its saved model is already complete or cannot merge)")
    if cfg.task == "multitask":
        _validate_multitask(cfg)
    elif cfg.task == "rl":
        _validate_rl(cfg)
    elif cfg.tasks:
        raise TunelabError("config key 'tasks' is for task: multitask; set task=multitask or remove 'tasks'")
    elif cfg.data.dataset is None and cfg.data.train is None:
        raise TunelabError("config: set data.dataset (a built-in set) or data.train (a file)")


def _validate_multitask(cfg: RunConfig):
    m = cfg.multitask
    if len(cfg.tasks) < 2:
        raise TunelabError("task: multitask needs at least two entries under 'tasks' (NAME: {task: ner|classify|"
                           "generate, data: {...}, weight: 1.0}); one task is a plain run (task: ner ...)")
    for name, spec in cfg.tasks.items():
        key = f"tasks.{name}"
        if spec.task not in TASKS:
            raise TunelabError(f"config key '{key}.task': {spec.task!r} is not one of {', '.join(TASKS)}")
        if spec.data.dataset is None and spec.data.train is None:
            raise TunelabError(f"config: set {key}.data.dataset (a built-in set) or {key}.data.train (a file)")
        if not spec.weight > 0:
            raise TunelabError(f"config key '{key}.weight': {spec.weight!r} must be > 0")
        if spec.max_length is not None and spec.max_length < 8:
            raise TunelabError(f"config key '{key}.max_length': {spec.max_length!r} is out of range")
    if cfg.tune.method not in MULTITASK_METHODS:
        raise TunelabError(f"config key 'tune.method': multi-task runs take {', '.join(MULTITASK_METHODS)} "
                           f"(lora = one adapter per task), not {cfg.tune.method}")
    if cfg.tune.merge:
        raise TunelabError("config key 'tune.merge': a multi-task folder keeps its per-task adapters; "
                           "`tunelab export DIR --task NAME OUT` writes one task merged into a plain model")
    if m.weighting == "pcgrad" and m.mix != "all":
        raise TunelabError("config key 'multitask.weighting': pcgrad compares the tasks' gradients within a "
                           "step, so it needs multitask.mix=all (one batch of every task per step)")
    if m.select != "mean" and m.select not in cfg.tasks:
        raise TunelabError(f"config key 'multitask.select': {m.select!r} is neither 'mean' nor a task name "
                           f"({', '.join(cfg.tasks)})")
    if m.temperature <= 0 or not 0 < m.anneal_min <= 1:
        raise TunelabError("config keys 'multitask.temperature' (> 0) and 'multitask.anneal_min' (0 < x <= 1) "
                           "are out of range")
    if m.train_backbone and cfg.tune.method != "lora":
        raise TunelabError("config key 'multitask.train_backbone' applies to tune.method=lora (per-task "
                           "adapters); with full tuning the backbone always trains")


RL_METHODS = ("full", "lora")  # lora: the reference is the same weights with the adapter off


def _validate_rl(cfg: RunConfig):
    r = cfg.rl
    if cfg.data.dataset is None and cfg.data.train is None:
        raise TunelabError("config: set data.dataset (a built-in set of prompts) or data.train (a file with a "
                           f"{cfg.data.prompt_field!r} field per line)")
    if not r.rewards:
        raise TunelabError("config key 'rl.rewards': name at least one reward with its weight, e.g. "
                           "rl.rewards.rouge_l=1 (bleu, rouge_l, classifier, length, repetition, module:function)")
    if cfg.tune.method not in RL_METHODS:
        raise TunelabError(f"config key 'tune.method': RL trains {' or '.join(RL_METHODS)}, not {cfg.tune.method}")
    if "classifier" in r.rewards and not (r.classifier and r.classifier_label):
        raise TunelabError("config keys 'rl.classifier' and 'rl.classifier_label': the classifier reward needs a "
                           "tunelab classification folder and the label whose probability it rewards")
    checks = [("rl.steps", r.steps > 0), ("rl.lr", r.lr > 0), ("rl.prompts_per_step", r.prompts_per_step > 0),
              ("rl.samples_per_prompt", r.samples_per_prompt > 0), ("rl.micro_batch", r.micro_batch > 0),
              ("rl.temperature", r.temperature > 0), ("rl.top_p", 0 < r.top_p <= 1),
              ("rl.max_new_tokens", r.max_new_tokens > 0), ("rl.baseline_decay", 0 <= r.baseline_decay < 1),
              ("rl.ppo_epochs", r.ppo_epochs > 0), ("rl.clip", 0 < r.clip < 1), ("rl.kl_coef", r.kl_coef >= 0),
              ("rl.kl_target", r.kl_target is None or r.kl_target > 0), ("rl.kl_horizon", r.kl_horizon > 0),
              ("rl.entropy_coef", r.entropy_coef >= 0), ("rl.target_words", r.target_words > 0),
              ("rl.eval_every", r.eval_every >= 0), ("rl.eval_prompts", r.eval_prompts > 0),
              ("rl.save_every", r.save_every > 0), ("rl.warmup_steps", r.warmup_steps >= 0)]
    for key, ok in checks:
        if not ok:
            raise TunelabError(f"config key {key!r}: {getattr(r, key.split('.')[1])!r} is out of range")
    if r.estimator in ("rloo",) and r.samples_per_prompt < 2:
        raise TunelabError("config key 'rl.samples_per_prompt': rloo's leave-one-out baseline needs at least 2 "
                           "samples per prompt")
    if r.kl_target is not None and r.kl_coef == 0:
        raise TunelabError("config key 'rl.kl_target': an adaptive KL coefficient must start above 0 "
                           "(set rl.kl_coef)")


def parse_override(arg: str) -> tuple[list[str], object]:
    if "=" not in arg:
        raise TunelabError(f"override {arg!r}: expected key.sub=value")
    key, raw = arg.split("=", 1)
    # YAML parsing gives numbers, booleans and null the same meaning they have in a recipe file.
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _wants_text(cfg, keys: list[str]) -> bool:
    obj = cfg
    for k in keys[:-1]:
        obj = obj.get(k) if isinstance(obj, dict) else getattr(obj, k, None)
        if isinstance(obj, dict):
            continue
        if not dataclasses.is_dataclass(obj):
            return False
    hint = typing.get_type_hints(type(obj)).get(keys[-1])
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and str in typing.get_args(hint))


def load_config(path=None, overrides=(), base: dict | None = None) -> RunConfig:
    """RunConfig from an optional YAML file, an optional dict, then `key.sub=value` overrides."""
    cfg = RunConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TunelabError(f"{path}: no such recipe file")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise TunelabError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        _fill(cfg, values, "", str(path))
    if base:
        _fill(cfg, base, "", "config")
    for arg in overrides:
        keys, value = parse_override(arg)
        if not isinstance(value, str) and value is not None and _wants_text(cfg, keys):
            value = arg.split("=", 1)[1]  # a text key takes the text as written (e.g. "Headline:" or "yes")
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        _fill(cfg, nested, "", f"override {arg!r}")
    _validate(cfg)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
