"""Installing kvforge leaves transformers' view of the world alone, and the package list is complete."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO

# Run from the repository root, where '' (or the script's folder) is the first entry of sys.path: the
# place where a top-level `kernels/` package used to shadow Hugging Face's `kernels` (transformers >= 5.25
# imports it from transformers.activations). The module prints where each package really came from.
_WHERE = (REPO / "tests" / "where_imports_resolve.py").read_text()
_SITE = Path(sysconfig.get_paths()["purelib"]).resolve()


def _check_where(stdout: str) -> None:
    where = json.loads(stdout.strip().splitlines()[-1])
    hf = Path(where["kernels"]).resolve()
    assert hf.is_relative_to(_SITE), f"`import kernels` found {hf}, not Hugging Face's package in {_SITE}"
    assert not hf.is_relative_to((REPO / "kernels").resolve())
    assert str(REPO / "kernels") in where["kvforge.kernels"]
    assert Path(where["attention"]) == REPO / "kernels" / "attention.py"


def _run_in_repo_root(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )


def test_hugging_face_kernels_is_installed():
    # transformers >= 5.25 depends on it; the shadowing tests below are only meaningful with it present.
    result = subprocess.run(
        [sys.executable, "-c", "import kernels; print(kernels.__file__)"],
        cwd="/",
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert Path(result.stdout.strip()).resolve().is_relative_to(_SITE)


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(["-c", _WHERE], id="python -c"),
        pytest.param(["-"], id="python session (stdin)"),
        pytest.param(["-m", "tests.where_imports_resolve"], id="python -m"),
    ],
)
def test_repository_root_never_shadows_hugging_face_kernels(launcher):
    stdin = _WHERE if launcher == ["-"] else None
    result = subprocess.run(
        [sys.executable, *launcher], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_where(result.stdout)


def test_pytest_process_itself_imports_hugging_face_kernels():
    # pytest inserted the rootdir (the repository root) into sys.path to import tests/ as a package.
    import kernels
    import kvforge.kernels.attention

    assert Path(kernels.__file__).resolve().is_relative_to(_SITE)
    assert Path(kvforge.kernels.attention.__file__) == REPO / "kernels" / "attention.py"


def test_train_py_starts_with_hugging_face_kernels():
    # `python train.py` puts the repository root first on sys.path (the script's folder).
    result = _run_in_repo_root("train.py", "fit", "--print_config", "--config", "configs/uptrain/gqa2.yaml")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model:" in result.stdout


def test_transformers_imports_and_runs_a_model_with_default_attention():
    code = (
        "import torch, transformers\n"
        "import kvforge.kernels.attention, kvforge.arch\n"
        "cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,"
        " num_attention_heads=4, num_key_value_heads=2)\n"
        "model = transformers.AutoModelForCausalLM.from_config(cfg)\n"
        "out = model(torch.randint(0, 64, (1, 8)))\n"
        "assert out.logits.shape == (1, 8, 64)\n"
        "print(model.config._attn_implementation)\n"
    )
    result = _run_in_repo_root("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "sdpa"


def test_every_source_package_is_declared_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = config["tool"]["setuptools"]["package-dir"]
    on_disk = {
        f"kvforge.{path.parent.relative_to(REPO).as_posix().replace('/', '.')}"
        for top in ("kernels", "arch", "conversion", "training", "evaluation", "cli")
        for path in (REPO / top).rglob("*.py")
    }
    assert on_disk <= set(declared), f"add {sorted(on_disk - set(declared))} to [tool.setuptools] package-dir"
    assert set(config["tool"]["setuptools"]["packages"]) == set(declared)
    assert not (REPO / "kernels" / "__init__.py").exists(), (
        "kernels/ must stay a namespace folder (kernels/README.md)"
    )
