"""benchmarks/gpu.py runs end to end (``--smoke``: tiny shapes on CPU) and from a plain source
checkout, as it must on the lent GPU machine where kvforge is not installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import REPO


@pytest.mark.slow  # ~10 s of CPU, mostly importing torch and transformers in a fresh process
def test_gpu_benchmark_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu.json"
    args = [
        "--smoke",
        "--out",
        str(out),
        "--forms",
        "gqa,mla",
        "--attention-forms",
        "gqa,documents,mla-decode",
    ]
    args += ["--backends", "eager,sdpa,flex,auto"]
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(out.read_text())
    attention = {(r["form"], r["context"], r["backend"]): r for r in results["attention"]}
    assert attention["gqa", 64, "sdpa"]["status"] == "ok"
    assert attention["documents", 64, "flex"]["status"] == "ok"
    assert attention["gqa", 64, "auto"]["resolved"] == "sdpa"
    assert {(r["impl"], r["form"]) for r in results["training"] if r["status"] == "ok"} == {
        ("transformers", "gqa"),
        ("kvforge", "gqa"),
        ("kvforge", "mla"),
    }
    decode = {(r["impl"], r["form"]): r for r in results["decode"]}
    assert decode["kvforge", "mla"]["status"] == "ok" and decode["transformers", "mla"]["status"] == "ok"
    assert decode["kvforge", "gqa"]["vs_transformers"] > 0
    assert {t["status"] for t in results["targets"]} == {"smoke run: not judged"}
    assert "| form | impl | context |" in result.stdout


def test_kvforge_imports_from_a_source_checkout_without_installation():
    # `python -S`: no site-packages processing, so the editable install's finder is not there;
    # torch comes from site-packages added by hand, kvforge only from the shim.
    code = (
        "import sys; sys.path += [sys.argv[1], sys.argv[2]]\n"
        "import importlib.util; assert importlib.util.find_spec('kvforge') is None\n"
        "from benchmarks.source_tree import ensure_kvforge_importable; ensure_kvforge_importable()\n"
        "import kvforge.kernels.attention, kvforge.arch\n"
        "print(kvforge.kernels.attention.__file__)\n"
    )
    site = sysconfig.get_paths()["purelib"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, str(REPO), site],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(REPO / "kernels" / "attention.py")
