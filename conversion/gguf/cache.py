"""A model path for the commands that read model directories: a directory as it is, a ``.gguf`` file
imported once into a cache (keyed by the file's sha256) and the cached directory from then on.

The cache is ``$KVFORGE_CACHE/gguf`` (default ``~/.cache/kvforge/gguf``); delete it freely.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import remove_stale_temporaries
from .reading import import_gguf, read_provenance, sha256_of

GGUF_SUFFIX = ".gguf"


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == GGUF_SUFFIX and Path(path).is_file()


def cache_root() -> Path:
    return Path(os.environ.get("KVFORGE_CACHE", Path.home() / ".cache" / "kvforge")).expanduser() / "gguf"


def model_directory(path: str | Path, *, progress: bool = False, log=print) -> Path:
    """``path`` itself unless it is a GGUF file; a GGUF file's imported directory (imported on first use)."""
    path = Path(path)
    if not is_gguf(path):
        return path
    digest = sha256_of(path)
    out = cache_root() / f"{path.stem}-{digest[:16]}"
    provenance = read_provenance(out) if out.is_dir() else None
    if provenance is not None and provenance.get("sha256") == digest:
        log(f"{path}: using the import cached in {out}")
        return out
    remove_stale_temporaries(out)
    log(f"{path}: importing the GGUF into {out} (once; later runs reuse it)")
    return import_gguf(path, out, overwrite=out.exists(), progress=progress)
