"""Shared fixtures: tiny configs of every form, and the real checkpoints in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

# CI replays a fixed set of examples (no flaky discoveries in CI); locally every run explores new ones.
settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one intra-op thread per process is as fast as two, and the multi-process tests
# (DDP/FSDP2 on 2 ranks, train.py subprocesses) do not oversubscribe the cores. KVFORGE_TEST_THREADS overrides.
_THREADS = os.environ.get("KVFORGE_TEST_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", _THREADS)
torch.set_num_threads(int(_THREADS))
# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("KVFORGE_SHARED_DATA", REPO.parent / "shared" / "data"))


def tiny_base(**overrides):
    from kvforge.arch import ModelConfig

    fields = dict(vocab_size=97, d_model=64, n_layers=4, n_heads=8, max_seq_len=64, init_std=0.05)
    fields.update(overrides)
    return ModelConfig(**fields)


# Every Gemma 3 trait of ModelConfig: GeGLU (tanh), 1 + w norms, sandwich norms, scaled embeddings, q/k norms.
GEMMA3_TRAITS = dict(
    mlp_activation="gelu_pytorch_tanh",
    norm_unit_offset=True,
    sandwich_norms=True,
    embed_scale=True,
    qk_norm=True,
)


def tiny_form(form: str, **overrides):
    from kvforge.arch.presets import with_form

    return with_form(tiny_base(**overrides), form, window=5, kv_lora_rank=24, rope_dims=4)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found (set KVFORGE_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def real_model() -> Path:
    """SmolLM2-135M-Instruct imported from its GGUF (``make real-model``); skips the test when absent."""
    from benchmarks.real_model_fetch import real_model_dir, real_models_root

    found = real_model_dir()
    if found is None:
        pytest.skip(
            f"the real model is not in {real_models_root()} ($KVFORGE_REAL_MODELS): "
            "run `make real-model` (python -m benchmarks.real_models fetch) to fetch it"
        )
    return found
