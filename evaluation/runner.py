"""Run the evaluation suite on one model: the Python entry point behind ``kvforge eval``.

from kvforge.evaluation import EvalSettings, evaluate_model, load_for_eval
report = evaluate_model(load_for_eval("path/to/model"), EvalSettings(corpora=["val.txt"]))
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from kvforge.arch import describe_layers, kv_bytes_per_token, mha_equivalent, parse_dtype
from kvforge.conversion.loading import EvalModel
from kvforge.evaluation.schema import documented

from .corpus import load_corpus, read_text
from .kv_memory import MemoryRow
from .latency import LatencyRow, measure_decode
from .needles import NeedleReport, NeedleSettings, NeedleTask, needle_accuracy
from .passkey import CLASSIC_FILLER, PasskeyReport, PasskeySettings, PasskeyTask, retrieval_accuracy
from .perplexity import PerplexityRow, check_context, default_contexts, perplexity, perplexity_vs_context

TASKS = ("perplexity", "context", "passkey", "needles", "memory")  # "memory" also times prefill and decode
DEFAULT_TASKS = ("perplexity", "context", "passkey", "memory")
TEXT_TASKS = ("perplexity", "context", "passkey", "needles")


@dataclass
class EvalSettings:
    tasks: list[str] = documented(
        "what was run: perplexity (at `context`), context (perplexity versus context length), passkey, "
        "needles (multi-key needle retrieval), memory (KV bytes, peak memory, prefill/decode latency)",
        default_factory=lambda: list(DEFAULT_TASKS),
    )
    corpora: list[str] = documented(
        "evaluation text files (.txt, or .json/.jsonl/.csv/.parquet rows)", default_factory=list
    )
    text_field: str = documented("column holding the text in .json/.jsonl/.csv/.parquet files", "text")
    context: int | None = documented("window of the perplexity task; null = the model's max_seq_len", None)
    stride: int | None = documented(
        "stride of the perplexity task; null = `context` (non-overlapping windows)", None
    )
    max_tokens: int | None = documented("evaluate only the first N tokens of each corpus; null = all", None)
    contexts: list[int] | None = documented(
        "context lengths of the `context` and `memory` tasks; null = powers of two from 128 to max_seq_len",
        None,
    )
    context_stride_fraction: float = documented(
        "stride of the `context` task as a fraction of each context length (1 = non-overlapping)", 1.0
    )
    batch_size: int = documented("windows (perplexity) or prompts (passkey) per forward pass", 8)
    passkey: PasskeySettings = documented("passkey prompt generation", default_factory=PasskeySettings)
    needles: NeedleSettings = documented(
        "multi-key needle prompt generation (the passkey filler)", default_factory=NeedleSettings
    )
    passkey_finetune: bool = documented(
        "whether a copy of each model got the staged passkey fine-tune (PasskeyFinetuneConfig defaults, "
        "600 steps on prompts up to 128 tokens) before the passkey task; false = zero-shot",
        False,
    )
    latency_batches: list[int] = documented(
        "batch sizes of the memory/latency task", default_factory=lambda: [1, 4]
    )
    decode_steps: int = documented("decode steps timed per generation in the memory/latency task", 16)
    repeats: int = documented("timed generations per (batch, context); medians are reported", 3)
    cache_dtype: str | None = documented("KV-cache element type; null = the model's dtype", None)
    device: str = documented("device the models ran on (auto = cuda when available)", "auto")
    dtype: str = documented("model weights dtype", "fp32")


@dataclass
class LayerRow:
    layer: int = documented("layer index")
    form: str = documented("attention form: mha, gqa-N (N KV heads), mqa or mla")
    window: int | None = documented("sliding window in tokens; null = global attention")
    kv_from: int | None = documented("layer whose K/V this layer reads (cross-layer sharing); null = its own")
    values_per_token: int = documented("cached values one token adds to this layer (0 when shared)")
    bytes: int = documented(
        "cache bytes of this layer for one sequence of `kv_context` tokens in `kv_dtype` (state included)"
    )
    state_bytes: int = documented("fixed state bytes per sequence (constant-state layers; 0 for others)", 0)


@dataclass
class ModelReport:
    name: str = documented("label of the model (its directory name unless given)")
    source: str = documented("path the model was loaded from")
    family: str = documented("checkpoint family it was read as (llama, ...)")
    n_parameters: int = documented("parameters (tied weights counted once)")
    max_seq_len: int = documented("positions the model supports (max_position_embeddings)")
    kv_context: int = documented(
        "tokens per sequence the KV figures (kv_bytes_per_token, layers[].bytes) are for: the perplexity "
        "task's context (`settings.context`, else max_seq_len)"
    )
    kv_dtype: str = documented("cache element type the KV figures are for (`settings.cache_dtype`)")
    kv_bytes_per_token: float = documented(
        "analytic KV-cache bytes per token of one `kv_context`-token sequence in `kv_dtype`, all layers "
        "(a sliding window caps what its layer holds)"
    )
    kv_ratio_vs_mha: float = documented("kv_bytes_per_token divided by the same for plain MHA of this width")
    layers: list[LayerRow] = documented("one entry per layer: its form and cache bytes")
    perplexity: list[PerplexityRow] = documented("one entry per corpus, at `settings.context`")
    perplexity_vs_context: list[PerplexityRow] = documented("first corpus at each of `settings.contexts`")
    passkey: PasskeyReport | None = documented("passkey retrieval; null when not run")
    needles: NeedleReport | None = documented("multi-key needle retrieval; null when not run")
    memory: list[MemoryRow] = documented("one entry per (batch, context) of the memory task")
    latency: list[LatencyRow] = documented("one entry per (batch, context) of the memory task")
    elapsed_s: float = documented("wall-clock seconds this model's evaluation took")


def check_settings(settings: EvalSettings) -> None:
    unknown = [task for task in settings.tasks if task not in TASKS]
    if unknown:
        raise ValueError(f"tasks {unknown} are not known; allowed: {list(TASKS)}")
    if any(task in settings.tasks for task in ("perplexity", "context")) and not settings.corpora:
        raise ValueError("the perplexity and context tasks need at least one corpus (a text file)")
    if settings.batch_size < 1:
        raise ValueError(f"batch_size={settings.batch_size} must be at least 1")


def evaluate_model(loaded: EvalModel, settings: EvalSettings) -> ModelReport:
    """Every task of ``settings`` on one model; the model itself is left unchanged."""
    check_settings(settings)
    started = time.perf_counter()
    model, config = loaded.model, loaded.model.config
    if loaded.tokenizer is None and any(task in settings.tasks for task in TEXT_TASKS):
        raise ValueError(
            f"{loaded.source} has no tokenizer files, which the text tasks {list(TEXT_TASKS)} need; "
            "pass a tokenizer directory or run only the memory task"
        )
    context = settings.context or config.max_seq_len
    check_context(model, context)
    contexts = settings.contexts or default_contexts(config.max_seq_len)
    for length in contexts:
        check_context(model, length, "contexts")
    cache_dtype = (
        parse_dtype(settings.cache_dtype) if settings.cache_dtype else model.model.embed_tokens.weight.dtype
    )
    corpora = [
        load_corpus(path, loaded.tokenizer, max_tokens=settings.max_tokens, text_field=settings.text_field)
        for path in (settings.corpora if {"perplexity", "context"} & set(settings.tasks) else [])
    ]
    rows = []
    if "perplexity" in settings.tasks:
        rows = [perplexity(model, c, context, settings.stride, settings.batch_size) for c in corpora]
    curve = []
    if "context" in settings.tasks:
        curve = perplexity_vs_context(
            model, corpora[0], contexts, settings.context_stride_fraction, settings.batch_size
        )
    passkey = None
    if "passkey" in settings.tasks:
        passkey = run_passkey(loaded, settings, contexts)
    needles = run_needles(loaded, settings, contexts) if "needles" in settings.tasks else None
    latency, memory = [], []
    if "memory" in settings.tasks:
        latency, memory = measure_decode(
            model, settings.latency_batches, contexts, settings.decode_steps, settings.repeats, cache_dtype
        )
    # the KV figures are at the context the loss was measured at, in the cache's dtype
    per_token = kv_bytes_per_token(config, context, cache_dtype)
    return ModelReport(
        name=loaded.name,
        source=str(loaded.source),
        family=loaded.family,
        n_parameters=model.num_parameters(),
        max_seq_len=config.max_seq_len,
        kv_context=context,
        kv_dtype=str(cache_dtype).removeprefix("torch."),
        kv_bytes_per_token=per_token,
        kv_ratio_vs_mha=per_token / kv_bytes_per_token(mha_equivalent(config), context, cache_dtype),
        layers=[LayerRow(**row) for row in describe_layers(config, context, cache_dtype)],
        perplexity=rows,
        perplexity_vs_context=curve,
        passkey=passkey,
        needles=needles,
        memory=memory,
        latency=latency,
        elapsed_s=time.perf_counter() - started,
    )


def run_needles(loaded: EvalModel, settings: EvalSettings, contexts: list[int]) -> NeedleReport:
    """Multi-key needle accuracy (zero-shot), with the passkey task's filler."""
    needles = dataclasses.replace(
        settings.needles, contexts=settings.needles.contexts or settings.passkey.contexts or contexts
    )
    for length in needles.contexts:
        check_context(loaded.model, length, "needle contexts")
    filler = (
        CLASSIC_FILLER if settings.passkey.filler == "classic" else read_text(Path(settings.passkey.filler))
    )
    task = NeedleTask(loaded.tokenizer, filler, needles.key_digits, needles.n_keys)
    return needle_accuracy(loaded.model, task, needles, batch_size=settings.batch_size)


def run_passkey(loaded: EvalModel, settings: EvalSettings, contexts: list[int]) -> PasskeyReport:
    """Passkey accuracy, after the passkey fine-tune of a copy of the model when asked."""
    passkey = dataclasses.replace(settings.passkey, contexts=settings.passkey.contexts or contexts)
    for length in passkey.contexts:
        check_context(loaded.model, length, "passkey contexts")
    filler = CLASSIC_FILLER if passkey.filler == "classic" else read_text(Path(passkey.filler))
    task = PasskeyTask(loaded.tokenizer, filler, passkey.key_digits)
    model = loaded.model
    if settings.passkey_finetune:
        from .passkey_finetune import finetune_passkey  # imports Lightning (heavy): only when asked for

        model = copy.deepcopy(model)
        finetune_passkey(model, task)
    return retrieval_accuracy(model, task, passkey, batch_size=settings.batch_size)
