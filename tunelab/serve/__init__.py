"""`tunelab serve MODEL_DIR`: an HTTP server (FastAPI on uvicorn) for any folder `Predictor` loads.

    batcher.py  micro-batching: a bounded queue, one worker, one model thread
    model.py    the loaded model: task names, labels, the batch call (the same text -> records path as
                `tunelab predict`)
    api.py      request/response shapes, limits, validation into errors that name the field
    app.py      routes, API-key check, body-size limit, error bodies, lifespan, metrics

With --workers N, uvicorn runs N processes, each with its own copy of the model and its own batcher.
"""

import copy
import json
import logging
import logging.config
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.serve.api import Limits
from tunelab.serve.app import create_app
from tunelab.serve.model import ModelService

__all__ = ["Limits", "ServeOptions", "ModelService", "create_app", "load_service", "serve"]

_OPTIONS_ENV = "TUNELAB_SERVE_OPTIONS"  # how the parent hands the options to --workers processes
log = logging.getLogger("tunelab.serve")


@dataclass
class ServeOptions:
    model_dir: str
    limits: Limits = field(default_factory=Limits)
    device: str = "auto"
    threads: int | None = None  # torch intra-op threads in each worker (None: torch's default)
    bf16: bool = False  # bf16 autocast, as the recipes train and evaluate
    adapters: dict[str, str] = field(default_factory=dict)  # name -> adapter folder, switched per request
    api_key_env: str = "TUNELAB_API_KEY"
    api_key_file: str | None = None
    quantize: str | None = None  # "int8": dynamically quantised, after the agreement check (tunelab.quantize)
    min_agreement: float | None = None  # the check's bar (None: tunelab.quantize.MIN_AGREEMENT)


def api_key(options: ServeOptions) -> str | None:
    """The key from --api-key-file, else from the environment variable; None (no auth) when neither is set."""
    if options.api_key_file:
        path = Path(options.api_key_file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise TunelabError(f"--api-key-file {path}: cannot read it ({e})") from None
        if not key:
            raise TunelabError(f"--api-key-file {path}: the file is empty")
        return key
    key = os.environ.get(options.api_key_env)
    if key is None:
        return None
    if not key.strip():
        raise TunelabError(f"{options.api_key_env} is set but empty: set a key, or unset it to serve without one")
    return key.strip()


def load_service(options: ServeOptions) -> ModelService:
    from tunelab.predict import Predictor

    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    # batch_size: a forward pass holds at most max_batch texts (NER windows of long texts may add a few).
    if options.quantize and options.adapters:
        raise TunelabError("--quantize and --adapter do not go together: a quantised model has its adapter merged "
                           "into int8 weights, so adapters cannot be switched per request")
    predictor = Predictor(options.model_dir, options.device, batch_size=options.limits.max_batch, bf16=options.bf16,
                          quantize=options.quantize, min_agreement=options.min_agreement)
    if predictor.quantized:
        for name, doc in predictor.quantized.items():
            log.info("%s: int8, predictions agree with the float model's on %.1f%% of %d check positions", name,
                     100 * doc["agreement"], doc["positions"])
    if predictor.task is not None and not predictor.task.predicts:
        raise TunelabError(f"{options.model_dir}: a {predictor.task.kind} folder is a backbone that makes no "
                           "predictions; fine-tune it (model.name=THIS_FOLDER) and serve the result")
    for name, folder in options.adapters.items():
        predictor.add_adapter(name, folder)
    return ModelService(predictor)


def app_from_options(options: ServeOptions):
    return create_app(load_service(options), options.limits, api_key(options))


def app_from_env():
    """The app factory each --workers process calls (uvicorn imports it by name)."""
    raw = json.loads(os.environ[_OPTIONS_ENV])
    return app_from_options(ServeOptions(**(raw | {"limits": Limits(**raw["limits"])})))


def serve(options: ServeOptions, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          access_log: bool = True) -> None:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from tunelab.predict import read_meta

    try:
        options.limits.check()
    except ValueError as e:
        raise TunelabError(str(e)) from None
    from tunelab.models import require_weights

    # a wrong folder fails here, before any process starts
    require_weights(options.model_dir, adapter=bool(read_meta(options.model_dir).get("adapter")))
    for folder in options.adapters.values():
        require_weights(folder, adapter=bool(read_meta(folder).get("adapter")))
    api_key(options)
    if workers < 1:
        raise TunelabError("--workers must be at least 1")
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["tunelab"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    kw = dict(host=host, port=port, log_config=log_config, access_log=access_log)
    if workers == 1:
        # The model loads before the port opens: a folder that cannot load is a one-line error, not a server
        # that never becomes ready.
        logging.config.dictConfig(log_config)
        uvicorn.run(app_from_options(options), **kw)
        return
    os.environ[_OPTIONS_ENV] = json.dumps(asdict(options))
    uvicorn.run("tunelab.serve:app_from_env", factory=True, workers=workers, **kw)
