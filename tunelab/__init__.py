"""tunelab: fine-tune pretrained transformers on real NLP tasks."""

__version__ = "0.1.0"


def finetune(config=None, overrides=(), *, train=None, dev=None, test=None, resume=False, overwrite=False, **values):
    """Python entry point: `tunelab.finetune("recipe.yaml", ["train.lr=3e-5"])` or
    `tunelab.finetune(task="classify", model={"name": ...}, train=[{"text":..., "label":...}, ...], dev=...)`.

    In-memory `train`/`dev`/`test` may be lists of records or a Hugging Face `datasets.Dataset`.
    """
    from tunelab.config import load_config
    from tunelab.data import Splits, from_hf_dataset, from_records
    from tunelab.train import train as run

    has_data = train is not None
    if has_data:
        values.setdefault("data", {}).setdefault("train", "<memory>")
    cfg = load_config(config, overrides, values or None)
    if cfg.task == "multitask":
        from tunelab.errors import TunelabError
        from tunelab.multitask import train as run_multitask

        if has_data:
            raise TunelabError("task: multitask reads each task's data from tasks.NAME.data (files or built-in "
                               "sets); in-memory train/dev/test are for single-task runs")
        return run_multitask(cfg, resume=resume, overwrite=overwrite)
    kind = "generate" if cfg.task == "rl" else cfg.task  # RL reads prompts (and references) like generation
    splits = None
    if has_data:
        def conv(x):
            if x is None:
                return []
            if hasattr(x, "column_names") and hasattr(x, "features"):
                return from_hf_dataset(x, kind)
            return from_records(list(x), kind)

        splits = Splits(conv(train), conv(dev), conv(test), {"source": "in-memory"})
    if cfg.task == "rl":
        from tunelab.rl import train as run_rl

        return run_rl(cfg, splits, resume=resume, overwrite=overwrite)
    return run(cfg, splits, resume=resume, overwrite=overwrite)

