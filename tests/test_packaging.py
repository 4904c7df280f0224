"""Installing kvforge leaves transformers' view of the world alone, and the package list is complete."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib

from tests.conftest import REPO


def test_no_top_level_kernels_module_shadows_hugging_face_kernels():
    # kvforge's kernels install as `kvforge.kernels`; a top-level `kernels` would make
    # transformers think the Hugging Face `kernels` package is present.
    spec = importlib.util.find_spec("kernels")
    assert spec is None or "kvforge" not in str(spec.origin)


def test_transformers_imports_and_runs_a_model_with_default_attention():
    code = (
        "import torch, transformers\n"
        "from transformers.utils import is_kernels_available\n"
        "import kvforge.kernels, kvforge.arch\n"
        "assert not is_kernels_available(), 'transformers sees a kernels package'\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2)\n"
        "model = transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "out = model(torch.randint(0, 64, (1, 8)))\n"
        "assert out.logits.shape == (1, 8, 64)\n"
        "print(model.config._attn_implementation)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sdpa"


def test_every_source_package_is_declared_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = config["tool"]["setuptools"]["package-dir"]
    on_disk = {
        f"kvforge.{path.parent.relative_to(REPO).as_posix().replace('/', '.')}"
        for top in ("kernels", "arch", "conversion", "training")
        for path in (REPO / top).rglob("__init__.py")
    }
    assert on_disk <= set(declared), f"add {sorted(on_disk - set(declared))} to [tool.setuptools] package-dir"
    assert set(config["tool"]["setuptools"]["packages"]) == set(declared)
