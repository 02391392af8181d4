"""tunelab's cache of converted packaged models: where it is, when a converted folder is complete, and how one
is put in place whole. Shared by the converters (tunelab.models.gguf, tunelab.models.e5)."""

import json
import os
import shutil
import tempfile
from pathlib import Path

SOURCE_FILE = "tunelab_source.json"  # a converted packaged model's provenance, with its conversion format


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE") or Path.home() / ".cache" / "tunelab").expanduser()


def cached_folder(folder: Path, fmt: int) -> bool:
    """A packaged model's converted folder is complete and of the current conversion format."""
    try:
        meta = json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("format") == fmt and all((folder / f).is_file() for f in ("config.json", "model.safetensors"))


def publish_folder(target: Path, fmt: int, write) -> None:
    """`write(folder)` fills a folder built beside `target`, which is then renamed into place: a killed
    conversion never leaves a half folder, and two processes converting at once both end with a whole one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    build.chmod(0o755)  # (mkdtemp makes it private; a cache may be shared)
    try:
        write(build)
        try:
            build.rename(target)
        except OSError:
            if not cached_folder(target, fmt):  # not another process's finished conversion: a stale leftover
                shutil.rmtree(target, ignore_errors=True)
                build.rename(target)
    finally:
        shutil.rmtree(build, ignore_errors=True)
