"""Exported models work in the tools people already use: EvalAI's lm-evaluation-harness on a local
task shipped in tests/evaluation/lm_eval_tasks, and a transformers pipeline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from kvforge.arch import CausalLM, generate
from kvforge.conversion import load_pretrained, save_pretrained
from kvforge.conversion.transforms import to_gqa
from tests.conftest import REPO, shared_path

TASK = "kvforge_tinystories_cloze"
TASK_DIR = REPO / "tests" / "evaluation" / "lm_eval_tasks"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """stories260K-mha mean-pooled to 2 KV heads, exported as a Llama directory, and the same model in kvforge."""
    source = load_pretrained(shared_path("stories260K-mha"))
    config, state_dict = to_gqa(source.config, source.state_dict, n_kv_heads=2, method="mean")
    out = save_pretrained(
        config, state_dict, tmp_path_factory.mktemp("export") / "gqa2", tokenizer_from=source.source
    )
    model = CausalLM(config).eval()
    model.load_state_dict(state_dict)
    return out, model


def _continuation_logprob(model: CausalLM, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context), tokenized as the harness does: with the tokenizer's own special
    tokens (BOS for this one), the whole string encoded once and split after the context."""
    context_ids = tokenizer.encode(context)
    whole = tokenizer.encode(context + continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(context_ids), len(whole)))


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'kvforge[eval]')",
)
def test_lm_eval_local_task_runs_on_an_exported_model_and_matches_kvforge_loglikelihoods(exported, tmp_path):
    model_dir, model = exported
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", TASK, "--include_path", str(TASK_DIR), "--device", "cpu", "--batch_size", "8",
        "--output_path", str(tmp_path), "--log_samples",
    ]  # fmt: skip
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
    }
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    accuracy = results["results"][TASK]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = [
        json.loads(line) for line in next(tmp_path.rglob(f"samples_{TASK}_*.jsonl")).read_text().splitlines()
    ]
    assert len(samples) == 20
    for sample in samples[:5]:
        doc = sample["doc"]
        harness = [float(resp[0][0]) for resp in sample["resps"]]
        ours = [_continuation_logprob(model, tokenizer, doc["context"], choice) for choice in doc["choices"]]
        assert ours == pytest.approx(harness, abs=1e-4)


def test_exported_model_generates_in_a_transformers_pipeline_as_in_kvforge(exported):
    from transformers import pipeline

    model_dir, model = exported
    generator = pipeline("text-generation", model=str(model_dir), dtype=torch.float32, device="cpu")
    prompt = "Once upon a time"
    output = generator(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0][
        "generated_token_ids"
    ]
    prompt_ids = generator.tokenizer(prompt, return_tensors="pt").input_ids
    ours = generate(model, prompt_ids, max_new_tokens=12)[0].tolist()
    assert list(output) == ours
