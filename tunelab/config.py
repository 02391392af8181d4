"""The run schema: dataclasses with defaults, filled from YAML, overridden by `key.sub=value` arguments.

Each field's allowed values or range sit beside it (`choice`, `ranged`: dataclass field metadata) and one walk,
_check_fields, checks them in every section and every `tasks:` entry; rules that tie fields together are spelled
out in _validate. Unknown keys, wrong types and bad values are errors naming the key and where its value came
from: a recipe's file and line, or the override. The resolved config is saved beside every model.
"""

import dataclasses
import operator
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tunelab.data.stream import FORMATS
from tunelab.data.tags import SCHEMES
from tunelab.errors import TunelabError, where
from tunelab.tasks import KINDS, task_type

# One tuple per set of choices, shared by the fields below and the code that acts on the value. Task types, tag
# schemes and input formats come from their torch-free owners; tunelab.peft, rl.estimators and multitask.sampling
# import torch, so their lists (ADAPTERS, ESTIMATORS, SAMPLINGS) live here and they import them (config must load
# without torch).
GEN_SELECT = ("loss", "bleu", "chrf", "rougeL")
TASKS = KINDS  # the task registry (tunelab.tasks): a plain run, or one entry of `tasks:`
SOLO_TASKS = ("prompt", "pretrain")  # task types that are a whole LM, not a head: never an entry of tasks/experiences
RUN_TASKS = TASKS + ("multitask", "rl", "continual")  # ... and the recipes that combine or sequence tasks or train by reward
ADAPTERS = ("lora", "ia3", "prompt", "prefix")  # tune methods that train a peft adapter
METHODS = ("full", *ADAPTERS, "bitfit", "head")
MULTITASK_METHODS = ("full", "lora", "bitfit", "head")  # lora: one adapter per task on the shared backbone
RL_METHODS = ("full", "lora")  # lora: the reference is the same weights with the adapter off
# continual.strategy: naive, joint, or these joined by "+" (replay+lwf); tunelab.continual acts on each
CONTINUAL = ("ewc", "replay", "lwf", "pseudo", "adapters")
ESTIMATORS = ("reinforce", "rloo", "self_critical", "ppo")
SAMPLINGS = ("proportional", "temperature", "round_robin", "annealed")
WEIGHTINGS = ("fixed", "uncertainty", "pcgrad")
LOSS_WEIGHTINGS = ("batch", "tokens")
SCHEDULERS = ("linear", "cosine", "constant")
ADVERSARIAL = ("none", "fgm", "pgd", "freelb")  # tunelab.robust: perturbations of the input embeddings
# tunelab.robust.augment.OPS (that module's registry is checked against this list by a test)
AUGMENTATIONS = ("char_noise", "case", "swap", "delete", "insert", "neighbours", "mentions")
DATA_FORMATS = tuple(f for f in FORMATS if f != "text")  # training data needs labels, which text lines lack


def choice(default, choices: tuple):
    """A field whose value must be one of `choices`."""
    return field(default=default, metadata={"choices": choices})


def ranged(default, *, gt=None, ge=None, lt=None, le=None):
    """A number field with bounds: ranged(0.1, ge=0, lt=1) takes 0 <= x < 1."""
    bounds = {op: b for op, b in (("gt", gt), ("ge", ge), ("lt", lt), ("le", le)) if b is not None}
    return field(default=default, metadata={"range": bounds})


_BOUNDS = {"gt": (operator.gt, ">"), "ge": (operator.ge, ">="), "lt": (operator.lt, "<"), "le": (operator.le, "<=")}


@dataclass
class ModelConfig:
    name: str = "all-MiniLM-L6-v2"  # a packaged model name (tunelab.models.PACKAGED) or a local folder
    max_length: int = ranged(256, ge=8)  # sub-word tokens per sequence, [CLS]/[SEP] included
    dropout: float | None = ranged(None, ge=0, lt=1)  # overrides the backbone's hidden/attention dropout when set
    trust_remote_code: bool = False
    max_unk_share: float = ranged(0.3, ge=0, le=1)  # refuse data whose tokens the tokenizer mostly cannot read
    # name is a fine-tuned folder: keep its head's labels (widened for the data's new ones) or start a new head
    head: str = choice("keep", ("keep", "new"))
    # keep only the embedding rows of the pieces the training and dev data use (tunelab.models.trim), plus the
    # special tokens and this many of the tokenizer's most probable other pieces for unseen text
    trim_vocab: bool = False
    trim_reserve: int = ranged(8000, ge=0)
    # task ner: a linear-chain CRF over the words' tag scores, trained jointly and Viterbi-decoded under the
    # IOB2 constraints (tunelab.models.crf); its transitions are saved beside the weights (crf.safetensors)
    crf: bool = False
    crf_lr: float = ranged(1e-2, gt=0)  # the CRF's learning rate: its few scores start at 0 and need to move far


@dataclass
class PromptConfig:
    """task: prompt (tunelab.tasks.prompt): classification by a causal LM's next words."""
    template: str = "{text}\nAnswer:"  # {text} (and {text_pair} for pairs) are filled in; a label's word follows
    # label -> its words (a label is said if any of them is; the first one answers in demonstrations); a label
    # left out is its own name
    verbalizer: dict[str, list[str]] = field(default_factory=dict)
    chat: bool = False  # the filled template as the user's turn of the tokenizer's chat template
    normalize: bool = True  # a word of several tokens scores its mean token log-probability, not the sum
    calibrate: bool = False  # contextual calibration (Zhao et al. 2021) against the content-free inputs
    content_free: list[str] = field(default_factory=lambda: ["N/A", "", "[MASK]"])
    shots: int = ranged(0, ge=0)  # in-context demonstrations (from the training split) before each input
    # random: one seeded draw shown before every input | similar: the nearest by the retriever, most similar last
    select: str = choice("random", ("random", "similar"))
    retriever: str = "all-MiniLM-L6-v2"  # select=similar: the sentence encoder (mean-pooled) that finds them
    demo_tokens: int = ranged(96, gt=0)  # each demonstration's text keeps at most this many tokens
    pool: int = ranged(512, gt=0)  # demonstration candidates kept (a seeded draw of the training split, saved)
    seed: int = 0  # the draws above


@dataclass
class PretrainConfig:
    """task: pretrain (tunelab.tasks.pretrain): continued masked or causal language modelling on raw text."""
    objective: str = choice("auto", ("auto", "mlm", "clm"))  # auto: mlm for an encoder, clm for a decoder
    mask_prob: float = ranged(0.15, gt=0, lt=1)  # mlm: share of tokens predicted (80 % [MASK], 10 % random, 10 % kept)
    whole_word: bool = False  # mlm: mask whole words (all their sub-word pieces) together


@dataclass
class DataConfig:
    # a built-in set (conll2003, msra, peoples_daily, bbc_news, chn_sentiment, rt_sentiment, bbc_headlines, rt_prompts, chitchat,
    # ecommerce_dialogue, squad, squad_shifts_*, vitaminc, xsum: tunelab.data.packaged.BUILTIN); unset: the files below
    dataset: str | None = None
    train: str | None = None
    dev: str | None = None
    test: str | None = None
    format: str | None = choice(None, DATA_FORMATS)  # from the file extension when unset
    text_field: str = "text"
    label_field: str = "label"
    # text pairs (NLI, paraphrase, similarity; classify, regress, multilabel): the JSONL/CSV field of the second
    # text, encoded as the tokenizer joins pairs ([CLS] a [SEP] b [SEP]); unset: single texts
    text_pair_field: str | None = None
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    prompt_field: str = "prompt"  # generation: JSONL/CSV field of the input
    target_field: str = "target"  # generation: JSONL/CSV field of the reference output
    prompt_suffix: str = "\n"  # generation with a causal LM: put between the prompt and the output it learns
    max_target_length: int = ranged(64, gt=0)  # generation: reference tokens kept in training; new tokens at prediction
    # generation: what dev selection maximises: the references' likelihood (loss; cheap, no decoding) or a score of
    # the greedy outputs (each dev evaluation then decodes the dev split). Test and `tunelab eval` always score
    # the outputs with sacreBLEU, chrF and ROUGE-L beside the loss.
    select_by: str = choice("loss", GEN_SELECT)
    # extractive QA: context windows overlap by this many tokens; answers are at most this many tokens; no_answer:
    # questions may have no answer in their context (SQuAD v2-style; the empty answer is then predicted)
    doc_stride: int = ranged(128, gt=0)
    max_answer_length: int = ranged(30, gt=0)
    no_answer: bool = False
    no_relation: str = "no_relation"  # relation extraction: the label meaning "no relation" (scored as abstaining)
    num_beams: int = ranged(1, ge=1)  # generation: 1 = greedy decoding; more = beam search (slower)
    tag_column: int = -1
    tag_scheme: str = choice("iob2", SCHEMES)  # scheme of the input files; converted to IOB2
    context_sentences: int = ranged(0, ge=0)  # NER: up to this many neighbouring sentences of one document as context
    max_train_examples: int | None = ranged(None, ge=1)  # first N training examples (quick runs)
    skip_train_examples: int = ranged(0, ge=0)  # leave out the first N (with max_train_examples: a window)
    only_labels: list[str] | None = None  # keep these labels (NER: entity types; others become O) and drop the rest
    max_eval_examples: int | None = ranged(None, ge=1)  # first N dev examples
    # few-shot: a seeded draw of N training examples per label (one-label task types), with sample_seed
    per_label: int | None = ranged(None, ge=1)
    sample_seed: int = 0
    prompt: PromptConfig = field(default_factory=PromptConfig)  # task: prompt
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)  # task: pretrain


@dataclass
class TrainConfig:
    epochs: float = ranged(3.0, ge=0)  # 0: no training (the model as it is: zero-shot prompting, a baseline)
    # at most this many optimizer steps (the schedule ends there too); 0 = what epochs give
    max_steps: int = ranged(0, ge=0)
    batch_size: int = ranged(32, gt=0)
    grad_accum: int = ranged(1, gt=0)
    lr: float = ranged(5e-5, gt=0)
    head_lr: float | None = ranged(None, gt=0)  # the new task head often wants a larger rate; None = lr
    weight_decay: float = ranged(0.01, ge=0)  # not applied to biases and LayerNorm weights
    warmup_ratio: float = ranged(0.1, ge=0, lt=1)
    scheduler: str = choice("linear", SCHEDULERS)
    max_grad_norm: float | None = ranged(1.0, ge=0)  # None or 0: no clipping
    group_by_length: bool = True
    # length grouping sorts pools of this many batches by length: smaller pools mix more (less padding saved)
    length_pool: int = ranged(64, ge=1)
    # batch: each batch's mean loss counts alike (the usual); tokens: a batch counts by its share of the
    # epoch's loss units (labelled tokens; examples), so that length-grouped batches weigh every token as
    # random batches do instead of favouring the tokens of short-sentence batches
    loss_weighting: str = choice("batch", LOSS_WEIGHTINGS)
    # training batches padded to a multiple of this length: fewer distinct shapes, so the allocator reuses
    # more (on CoNLL-2003 with MiniLM on a CPU, 8 against 1: 6-15 % lower peak memory at the same speed;
    # docs/benchmarks.md); 1 pads to the longest sequence only
    pad_to_multiple_of: int = ranged(8, ge=1)
    seed: int = 42
    # bf16 autocast: true | false | auto (on where the hardware computes bf16 natively: a CUDA GPU that
    # supports it, or a CPU with AVX512-BF16 or AMX; resolved when the config is loaded)
    bf16: bool | str = "auto"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int = ranged(0, ge=0)  # steps between dev evaluations; 0 = once per epoch
    # steps between resumable checkpoints; 0 = at each evaluation and every save_minutes
    save_every: int = ranged(0, ge=0)
    save_minutes: float = ranged(5.0, ge=0)  # at most this much work is lost to a crash (when save_every is 0)
    patience: int | None = ranged(None, ge=1)  # stop after this many evaluations without dev improvement
    threads: int | None = ranged(None, ge=1)  # torch CPU threads; None = torch's default
    # recompute each layer's activations in backward instead of keeping them: less memory for long sequences,
    # at about a third more compute (docs/benchmarks.md)
    gradient_checkpointing: bool = False


@dataclass
class TuneConfig:
    """Which parameters train. A new task head (classification) always trains; everything else per method."""
    method: str = choice("full", METHODS)
    lora_r: int = ranged(8, gt=0)
    lora_alpha: float = ranged(16.0, gt=0)
    lora_dropout: float = ranged(0.1, ge=0, lt=1)
    target_modules: list[str] | None = None  # LoRA/IA3 targets (module name suffixes); None = peft's default
    lora_embeddings: bool = False  # LoRA on the input embeddings too
    virtual_tokens: int = ranged(20, gt=0)  # prompt / prefix tuning
    prompt_init_text: str | None = None  # prompt tuning: start from this text's embeddings instead of random
    freeze_embeddings: bool = False  # keep the embedding layer fixed (any method)
    freeze_layers: int = ranged(0, ge=0)  # keep the lowest N transformer layers fixed (any method)
    merge: bool = False  # lora/ia3: also save the merged full model in OUTPUT_DIR/merged


@dataclass
class TaskSpec:
    """One task of a multi-task run (`tasks: {NAME: ...}`): its head type, data and loss weight."""
    task: str = choice("classify", TASKS)
    data: DataConfig = field(default_factory=DataConfig)
    weight: float = ranged(1.0, gt=0)  # multitask.weighting=fixed: this task's loss is multiplied by it
    max_length: int | None = ranged(None, ge=8)  # sub-word tokens per sequence for this task; None = model.max_length


@dataclass
class ExperienceSpec:
    """One experience of a continual run (`experiences: {NAME: {...}}`, in the order given)."""
    task: str = choice("classify", TASKS)
    data: DataConfig = field(default_factory=DataConfig)
    # the head it trains: experiences naming one head share it (new labels widen it: class-incremental; the
    # same labels on new data: domain-incremental); default: a head of its own (task-incremental)
    head: str | None = None
    max_length: int | None = ranged(None, ge=8)  # None = model.max_length


@dataclass
class ContinualConfig:
    """task: continual (tunelab.continual)."""
    strategy: str = "naive"  # naive | joint | ewc, replay, lwf, pseudo, adapters, or several joined by "+" (replay+lwf)
    ewc_lambda: float = ranged(1.0e4, ge=0)  # EWC: weight of the penalty (lambda/2) sum F (theta - theta*)^2
    ewc_decay: float = ranged(1.0, gt=0, le=1)  # online EWC: older experiences' Fisher is multiplied by it
    fisher_samples: int = ranged(512, gt=0)  # EWC: training examples per experience the Fisher is estimated on
    replay_size: int = ranged(1000, gt=0)  # replay: the reservoir buffer's bound, examples of all past experiences
    lwf_weight: float = ranged(1.0, ge=0)  # LwF: weight of the distillation from the previous model
    lwf_temperature: float = ranged(2.0, gt=0)
    reference: bool = False  # also train each experience alone from the start model: forward transfer
    eval_split: str = choice("test", ("test", "dev"))  # the accuracy matrix's data (dev: to choose settings on)


@dataclass
class MultiTaskConfig:
    """How the tasks of a multi-task run share the steps and the loss (task: multitask)."""
    sampling: str = choice("temperature", SAMPLINGS)
    temperature: float = ranged(2.0, gt=0)  # sampling=temperature: task probability proportional to size^(1/T)
    anneal_min: float = ranged(0.2, gt=0, le=1)  # sampling=annealed: the exponent on size falls from 1 to this
    mix: str = choice("one", ("one", "all"))  # one: each micro-batch is one task's | all: one batch of every task
    # fixed (tasks.NAME.weight) | uncertainty (learned per-task log-variances, trained at train.head_lr or
    # train.lr) | pcgrad (projects conflicting task gradients; needs mix=all)
    weighting: str = choice("fixed", WEIGHTINGS)
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
    estimator: str = choice("rloo", ESTIMATORS)
    steps: int = ranged(100, gt=0)  # rollouts (each followed by ppo_epochs updates for ppo, one update otherwise)
    lr: float = ranged(1e-5, gt=0)
    warmup_steps: int = ranged(0, ge=0)
    prompts_per_step: int = ranged(8, gt=0)
    samples_per_prompt: int = ranged(4, gt=0)  # k completions per prompt, from one generate call
    micro_batch: int = ranged(16, gt=0)  # completions per forward/backward (gradients accumulate over a rollout)
    temperature: float = ranged(1.0, gt=0)
    top_p: float = ranged(1.0, gt=0, le=1)
    max_new_tokens: int = ranged(24, gt=0)
    baseline_decay: float = ranged(0.9, ge=0, lt=1)  # reinforce: moving-average baseline of the mean reward
    ppo_epochs: int = ranged(4, gt=0)  # ppo: passes over each rollout
    clip: float = ranged(0.2, gt=0, lt=1)  # ppo: ratio clipped to [1 - clip, 1 + clip]
    kl_coef: float = ranged(0.05, ge=0)  # reward -= kl_coef * sum_t (log pi - log ref)
    kl_target: float | None = ranged(None, gt=0)  # adaptive coefficient (Ziegler et al.) towards this KL
    kl_horizon: int = ranged(10000, gt=0)
    entropy_coef: float = ranged(0.0, ge=0)  # loss -= entropy_coef * mean token entropy
    whiten: bool = False  # rewards (after the KL penalty) to zero mean, unit std per rollout
    # reward name -> weight: bleu, rouge_l, classifier, length, repetition, or a function "module:function"
    rewards: dict[str, float] = field(default_factory=dict)
    classifier: str | None = None  # rewards.classifier: a tunelab classification folder
    classifier_label: str | None = None  # ... and the label whose probability is the reward
    classifier_input: str = choice("completion", ("completion", "full"))  # full: prompt + completion
    target_words: int = ranged(10, gt=0)  # rewards.length: the length without penalty
    eval_every: int = ranged(0, ge=0)  # rollouts between held-out evaluations; 0 = before and after only
    eval_prompts: int = ranged(64, gt=0)  # held-out prompts (dev split) per evaluation
    save_every: int = ranged(10, gt=0)  # rollouts between resumable checkpoints


@dataclass
class RobustConfig:
    """Robust fine-tuning (tunelab.robust; supervised and multi-task recipes, not rl). Norms are L2 per example
    over its unpadded tokens x hidden size of the input embeddings."""
    # fgm: one step of size epsilon | pgd: `steps` projected steps of size alpha, the last one trains |
    # freelb: `steps` steps of size alpha from random noise, every one trains (gradients averaged)
    adversarial: str = choice("none", ADVERSARIAL)
    epsilon: float = ranged(1.0, gt=0)  # the radius of the perturbation (fgm: its exact size)
    alpha: float = ranged(0.3, gt=0)  # pgd, freelb: the ascent step size
    steps: int = ranged(3, ge=1)  # pgd, freelb: ascent steps K (ignored by fgm and none)
    rdrop: float = ranged(0.0, ge=0)  # R-Drop: weight of the symmetric KL between two dropout passes; 0 = off
    # data augmentation, each epoch anew: operation -> probability per training example (AUGMENTATIONS)
    augment: dict[str, float] = field(default_factory=dict)
    augment_intensity: float = ranged(0.1, gt=0, le=1)  # how much an operation changes (share of words, ...)


@dataclass
class RunConfig:
    task: str = choice("ner", RUN_TASKS)
    output_dir: str = "runs/run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)  # task: multitask
    multitask: MultiTaskConfig = field(default_factory=MultiTaskConfig)
    rl: RLConfig = field(default_factory=RLConfig)  # task: rl
    experiences: dict[str, ExperienceSpec] = field(default_factory=dict)  # task: continual, in order
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)  # supervised and multi-task recipes
    track: TrackConfig = field(default_factory=TrackConfig)


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


def _read_recipe(path: Path) -> tuple[object, dict[str, int]]:
    """A recipe's values, and the line of each key ('train.lr' -> 7; '' -> the document), read from the composed
    node tree so that errors about a key can point at its line."""
    loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
    try:
        node = loader.get_single_node()
        if node is None:  # an empty file
            return {}, {}
        values = loader.construct_document(node)
        lines = {"": node.start_mark.line + 1}
        _key_lines(loader, node, "", lines)
        return values or {}, lines
    finally:
        loader.dispose()


def _key_lines(loader, node, prefix: str, lines: dict):
    if not isinstance(node, yaml.MappingNode):
        return
    for key_node, value_node in node.value:  # merge keys (<<) were already expanded into this list
        key = prefix + str(loader.construct_object(key_node))  # the key as _fill names it ('yes' reads as True)
        lines[key] = key_node.start_mark.line + 1
        _key_lines(loader, value_node, key + ".", lines)


def _fill(obj, values: dict, prefix: str, source: str, lines: dict, sources: dict):
    """Set `obj`'s fields from one source's `values` (a recipe, a dict, an override), checking keys and types;
    note in `sources` where each key came from (a recipe's file:line via `lines`), for errors found later."""
    if not isinstance(values, dict):
        section = prefix.rstrip(".")
        raise TunelabError(f"{where(source, lines.get(section))}: {section or 'top level'} must be a mapping, got "
                           f"{values!r}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in values.items():
        key = prefix + str(k)
        here = sources[key] = where(source, lines.get(key))
        if k not in names:
            raise TunelabError(f"{here}: unknown config key {key!r}; valid keys here: {', '.join(sorted(names))}")
        current = getattr(obj, k)
        if typing.get_origin(hints[k]) is dict:  # named sub-sections (tasks: {NAME: {...}}) or values
            if not isinstance(v, dict):  # (empty in a saved single-task config.yaml)
                raise TunelabError(f"{here}: {key} must be a mapping of names to sections, got {v!r}")
            item = typing.get_args(hints[k])[1]
            for name, sub in v.items():
                sub_key = f"{key}.{name}"
                sources[sub_key] = where(source, lines.get(sub_key))
                if not dataclasses.is_dataclass(item):  # name -> value (rl.rewards: {rouge_l: 1.0})
                    current[str(name)] = _coerce_at(sub, item, sub_key, sources[sub_key])
                elif not isinstance(name, str) or not name.isidentifier():
                    raise TunelabError(f"{sources[sub_key]}: {key}: name {name!r} must be a plain identifier "
                                       "(letters, digits, _)")
                else:
                    _fill(current.setdefault(name, item()), sub, sub_key + ".", source, lines, sources)
        elif dataclasses.is_dataclass(current):
            _fill(current, v, key + ".", source, lines, sources)
        else:
            setattr(obj, k, _coerce_at(v, hints[k], key, here))


def _coerce_at(value, tp, key: str, here: str):
    try:
        return _coerce(value, tp, key)
    except TunelabError as e:
        raise TunelabError(f"{here}: {e}") from None


def _fail(sources: dict, key: str, message: str) -> TunelabError:
    """The error `message` about `key`, after where its value came from (none for a default)."""
    return TunelabError(f"{sources[key]}: {message}" if key in sources else message)


def _check_fields(obj, prefix: str, sources: dict):
    """The choices and range in each field's metadata, in every section and every `tasks:` entry."""
    for f in dataclasses.fields(obj):
        key, value = prefix + f.name, getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_fields(value, key + ".", sources)
        elif isinstance(value, dict):
            for name, sub in value.items():
                if dataclasses.is_dataclass(sub):
                    _check_fields(sub, f"{key}.{name}.", sources)
        elif value is not None:  # None got past the type check, so the field may be unset
            choices, bounds = f.metadata.get("choices"), f.metadata.get("range", {})
            if choices is not None and value not in choices:
                raise _fail(sources, key, f"config key {key!r}: {value!r} is not one of {', '.join(choices)}")
            if not all(_BOUNDS[op][0](value, bound) for op, bound in bounds.items()):
                rule = " and ".join(f"{_BOUNDS[op][1]} {bound}" for op, bound in bounds.items())
                raise _fail(sources, key, f"config key {key!r}: {value!r} is out of range (must be {rule})")


def _validate(cfg: RunConfig, sources: dict):
    _check_fields(cfg, "", sources)
    for op, p in cfg.robust.augment.items():
        key = f"robust.augment.{op}"
        if op not in AUGMENTATIONS:
            raise _fail(sources, key, f"config key {key!r}: no augmentation {op!r}; one of {', '.join(AUGMENTATIONS)}")
        if not 0 < p <= 1:
            raise _fail(sources, key, f"config key {key!r}: {p!r} is out of range (must be > 0 and <= 1: the "
                        "probability per training example)")
    # Rules between fields.
    if cfg.tune.merge and cfg.tune.method not in ("lora", "ia3"):
        raise _fail(sources, "tune.merge", "config key 'tune.merge': only lora and ia3 adapters merge into the "
                    f"weights, not tune.method={cfg.tune.method} (its saved model is already complete or cannot "
                    "merge)")
    if cfg.experiences and cfg.task != "continual":
        raise _fail(sources, "experiences", "config key 'experiences' is for task: continual; set task=continual "
                    "or remove 'experiences'")
    if cfg.train.epochs == 0 and cfg.task in ("multitask", "continual", "rl"):
        raise _fail(sources, "train.epochs", f"config key 'train.epochs': 0 (no training) is for a single task's "
                    f"run, where it evaluates the model as it is; task={cfg.task} trains by its own steps")
    if isinstance(cfg.train.bf16, str) and cfg.train.bf16 != "auto":
        raise _fail(sources, "train.bf16", f"config key 'train.bf16': {cfg.train.bf16!r}; use true, false or auto")
    if cfg.train.loss_weighting != "batch" and cfg.task in ("multitask", "continual", "rl"):
        raise _fail(sources, "train.loss_weighting", "config key 'train.loss_weighting' is for a single task's "
                    f"run; task={cfg.task} weighs its batches its own way (remove the key)")
    if cfg.train.gradient_checkpointing and cfg.task in ("multitask", "continual", "rl"):
        raise _fail(sources, "train.gradient_checkpointing", "config key 'train.gradient_checkpointing' is for a "
                    f"single task's run; task={cfg.task} does not support it yet (remove the key)")
    for key in ("trim_vocab", "crf"):
        if getattr(cfg.model, key) and cfg.task in ("multitask", "continual", "rl"):
            raise _fail(sources, f"model.{key}", f"config key 'model.{key}' is for a single task's run; "
                        f"task={cfg.task} does not support it yet (remove the key)")
    if cfg.model.crf and cfg.task in KINDS and not task_type(cfg.task).tag_sequences:
        raise _fail(sources, "model.crf", f"config key 'model.crf': a CRF tags word sequences (task: ner), not "
                    f"task={cfg.task}")
    if cfg.model.crf and cfg.tune.method in ADAPTERS:
        raise _fail(sources, "model.crf", f"config key 'model.crf' does not work with tune.method={cfg.tune.method} "
                    "yet (its transitions would not be saved with the adapter); use full, bitfit or head tuning")
    if cfg.task == "multitask":
        _validate_multitask(cfg, sources)
    elif cfg.task == "rl":
        _validate_rl(cfg, sources)
    elif cfg.task == "continual":
        _validate_continual(cfg, sources)
    elif cfg.tasks:
        raise _fail(sources, "tasks", "config key 'tasks' is for task: multitask; set task=multitask or remove "
                    "'tasks'")
    elif cfg.data.dataset is None and cfg.data.train is None:
        raise TunelabError("config: set data.dataset (a built-in set) or data.train (a file)")


def _validate_multitask(cfg: RunConfig, sources: dict):
    m = cfg.multitask
    if len(cfg.tasks) < 2:
        raise _fail(sources, "tasks", "task: multitask needs at least two entries under 'tasks' (NAME: {task: "
                    "ner|classify|generate, data: {...}, weight: 1.0}); one task is a plain run (task: ner ...)")
    for name, spec in cfg.tasks.items():
        key = f"tasks.{name}"
        if spec.task in SOLO_TASKS:
            raise _fail(sources, f"{key}.task", f"config key '{key}.task': {spec.task} runs on its own (its model is "
                        "a whole language model, not a head on a shared backbone); train it as task: "
                        f"{spec.task}, then use its folder as model.name")
        if spec.data.dataset is None and spec.data.train is None:
            raise _fail(sources, key, f"config: set {key}.data.dataset (a built-in set) or {key}.data.train "
                        "(a file)")
    if cfg.tune.method not in MULTITASK_METHODS:
        raise _fail(sources, "tune.method", f"config key 'tune.method': multi-task runs take "
                    f"{', '.join(MULTITASK_METHODS)} (lora = one adapter per task), not {cfg.tune.method}")
    if cfg.tune.merge:
        raise _fail(sources, "tune.merge", "config key 'tune.merge': a multi-task folder keeps its per-task "
                    "adapters; `tunelab export DIR --task NAME OUT` writes one task merged into a plain model")
    if m.weighting == "pcgrad" and m.mix != "all":
        raise _fail(sources, "multitask.weighting", "config key 'multitask.weighting': pcgrad compares the "
                    "tasks' gradients within a step, so it needs multitask.mix=all (one batch of every task per "
                    "step)")
    if m.select != "mean" and m.select not in cfg.tasks:
        raise _fail(sources, "multitask.select", f"config key 'multitask.select': {m.select!r} is neither "
                    f"'mean' nor a task name ({', '.join(cfg.tasks)})")
    if m.train_backbone and cfg.tune.method != "lora":
        raise _fail(sources, "multitask.train_backbone", "config key 'multitask.train_backbone' applies to "
                    "tune.method=lora (per-task adapters); with full tuning the backbone always trains")


def strategies(strategy: str) -> list[str]:
    """continual.strategy as its parts: [] for naive, ["joint"], or CONTINUAL names (replay+lwf)."""
    parts = [p.strip() for p in strategy.split("+")]
    if parts in (["naive"], ["joint"]):
        return [] if parts == ["naive"] else parts
    bad = [p for p in parts if p not in CONTINUAL]
    if bad or len(set(parts)) != len(parts):
        raise TunelabError(f"config key 'continual.strategy': {strategy!r} is not naive, joint, or a '+'-joined "
                           f"combination of {', '.join(CONTINUAL)}" + (f" ({bad[0]!r} is none of them)" if bad else ""))
    return parts


def _validate_continual(cfg: RunConfig, sources: dict):
    if len(cfg.experiences) < 2:
        raise _fail(sources, "experiences", "task: continual needs at least two entries under 'experiences' "
                    "(NAME: {task: ner|classify|generate, data: {...}, head: NAME}), in the order they arrive")
    try:
        parts = strategies(cfg.continual.strategy)
    except TunelabError as e:
        raise _fail(sources, "continual.strategy", str(e).removeprefix("config key 'continual.strategy': ")
                    if "continual.strategy" in sources else str(e)) from None
    kinds, users = {}, {}
    for name, spec in cfg.experiences.items():
        users.setdefault(spec.head or name, []).append(name)
    for name, spec in cfg.experiences.items():
        key = f"experiences.{name}"
        if spec.task in SOLO_TASKS:
            raise _fail(sources, f"{key}.task", f"config key '{key}.task': {spec.task} runs on its own, not as an "
                        f"experience of a continual run; train it as task: {spec.task}")
        if spec.data.dataset is None and spec.data.train is None:
            raise _fail(sources, key, f"config: set {key}.data.dataset (a built-in set) or {key}.data.train (a file)")
        head = spec.head or name
        if kinds.setdefault(head, spec.task) != spec.task:
            raise _fail(sources, f"{key}.head", f"config key '{key}.head': head {head!r} is a {kinds[head]} head; "
                        f"a {spec.task} experience needs a head of its own")
        if "adapters" in parts and len(users[head]) > 1:
            raise _fail(sources, f"{key}.head", f"config key '{key}.head': continual.strategy=adapters isolates one "
                        f"adapter per head, and {' and '.join(users[head])} share head {head!r}; give each its own "
                        "head, or use ewc, replay or lwf for experiences that share a head")
    if "pseudo" in parts and not any(len(users[h]) > 1 for h in users):
        raise _fail(sources, "continual.strategy", "config key 'continual.strategy': pseudo fills in the labels a "
                    "later experience of a shared head leaves out (class-incremental NER); no two experiences here "
                    "share a head")
    wanted = "lora" if "adapters" in parts else "full"
    if cfg.tune.method != wanted:
        raise _fail(sources, "tune.method", f"config key 'tune.method': continual.strategy={cfg.continual.strategy} "
                    f"trains with tune.method={wanted}" + (" (one LoRA adapter per experience, the backbone frozen)"
                                                            if wanted == "lora" else
                                                            "; per-experience adapters are continual.strategy=adapters"))
    if cfg.tune.merge:
        raise _fail(sources, "tune.merge", "config key 'tune.merge': a continual folder keeps one adapter per "
                    "experience; `tunelab export DIR --task NAME OUT` writes one merged into a plain model")


def _validate_rl(cfg: RunConfig, sources: dict):
    r = cfg.rl
    default = RobustConfig()
    changed = [f.name for f in dataclasses.fields(RobustConfig) if getattr(cfg.robust, f.name) != getattr(default, f.name)]
    if changed:
        raise _fail(sources, f"robust.{changed[0]}", f"config key 'robust.{changed[0]}': task: rl has no robust "
                    "fine-tuning (adversarial training and R-Drop act on a supervised loss); remove the robust "
                    "section")
    if cfg.data.dataset is None and cfg.data.train is None:
        raise TunelabError("config: set data.dataset (a built-in set of prompts) or data.train (a file with a "
                           f"{cfg.data.prompt_field!r} field per line)")
    if not r.rewards:
        raise TunelabError("config key 'rl.rewards': name at least one reward with its weight, e.g. "
                           "rl.rewards.rouge_l=1 (bleu, rouge_l, classifier, length, repetition, module:function)")
    if cfg.tune.method not in RL_METHODS:
        raise _fail(sources, "tune.method", f"config key 'tune.method': RL trains {' or '.join(RL_METHODS)}, "
                    f"not {cfg.tune.method}")
    if "classifier" in r.rewards and not (r.classifier and r.classifier_label):
        raise _fail(sources, "rl.rewards.classifier", "config keys 'rl.classifier' and 'rl.classifier_label': "
                    "the classifier reward needs a tunelab classification folder and the label whose probability "
                    "it rewards")
    if r.estimator == "rloo" and r.samples_per_prompt < 2:
        raise _fail(sources, "rl.samples_per_prompt", "config key 'rl.samples_per_prompt': rloo's leave-one-out "
                    "baseline needs at least 2 samples per prompt")
    if r.kl_target is not None and r.kl_coef == 0:
        raise _fail(sources, "rl.kl_target", "config key 'rl.kl_target': an adaptive KL coefficient must start "
                    "above 0 (set rl.kl_coef)")


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
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    # (a key that is a bool or a word, as train.bf16's true | false | auto, takes true/false as the bool)
    return hint is str or (str in args and bool not in args)


def load_config(path=None, overrides=(), base: dict | None = None) -> RunConfig:
    """RunConfig from an optional YAML file, an optional dict, then `key.sub=value` overrides."""
    cfg = RunConfig()
    sources = {}  # key -> where its value came from ('recipe.yaml:7', "override 'train.lr=0'")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise TunelabError(f"{path}: no such recipe file")
        try:
            values, lines = _read_recipe(path)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise TunelabError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        _fill(cfg, values, "", str(path), lines, sources)
    if base:
        _fill(cfg, base, "", "config", {}, sources)
    for arg in overrides:
        keys, value = parse_override(arg)
        if not isinstance(value, str) and value is not None and _wants_text(cfg, keys):
            value = arg.split("=", 1)[1]  # a text key takes the text as written (e.g. "Headline:" or "yes")
        nested = value
        for k in reversed(keys):
            nested = {k: nested}
        _fill(cfg, nested, "", f"override {arg!r}", {}, sources)
    _validate(cfg, sources)
    if cfg.train.bf16 == "auto":
        from tunelab.runtime import fast_bf16

        cfg.train.bf16 = fast_bf16(cfg.train.device)
    return cfg


def to_dict(cfg: RunConfig) -> dict:
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict by dotted key: {"train": {"lr": 1}} -> {"train.lr": 1}."""
    out = {}
    for k, v in d.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def to_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
