"""Evaluation of kvforge models: perplexity, perplexity versus context, passkey retrieval, measured
KV-cache bytes, peak memory and decode speed (``kvforge eval``), one module per job."""

from kvforge.conversion.loading import EvalModel, load_for_eval

from .corpus import Corpus, load_corpus, read_text
from .kv_memory import MemoryRow
from .latency import LatencyRow, measure_decode
from .passkey import PasskeySettings, PasskeyTask, is_exact_match, retrieval_accuracy
from .perplexity import PerplexityRow, default_contexts, perplexity, perplexity_vs_context
from .runner import EvalSettings, ModelReport, evaluate_model

__all__ = [
    "Corpus",
    "EvalModel",
    "EvalSettings",
    "LatencyRow",
    "MemoryRow",
    "ModelReport",
    "PasskeySettings",
    "PasskeyTask",
    "PerplexityRow",
    "default_contexts",
    "evaluate_model",
    "is_exact_match",
    "load_corpus",
    "load_for_eval",
    "measure_decode",
    "perplexity",
    "perplexity_vs_context",
    "read_text",
    "retrieval_accuracy",
]
