"""`python -m tests.where_imports_resolve` from the repository root: prints where `kernels` and
`kvforge.kernels` were imported from (tests/test_packaging.py checks it, as for `python -m benchmarks.*`)."""

import json

import transformers

transformers.LlamaConfig()
from transformers import LlamaForCausalLM  # noqa: E402, F401

import kernels  # noqa: E402
import kvforge.kernels  # noqa: E402
import kvforge.kernels.attention  # noqa: E402

print(
    json.dumps(
        {
            "kernels": kernels.__file__,
            "kvforge.kernels": list(kvforge.kernels.__path__),
            "attention": kvforge.kernels.attention.__file__,
        }
    )
)
