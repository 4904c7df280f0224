"""Sizes a config.json may declare, checked on the raw JSON before anything is built from it.

Every command reads a config before its weights (``inspect --config-only`` reads no weights at all), and
building the model's description already allocates per layer: a config declaring 10^9 layers must be
refused with the field named, not end in a ``MemoryError``. The bounds are far beyond any released model
(the largest have a few hundred layers, hidden sizes near 16k, vocabularies of a few hundred thousand,
a few trillion parameters) and far below what would exhaust a machine's memory while planning.
"""

from __future__ import annotations

# config.json key -> the largest value accepted
SIZE_BOUNDS = {
    "num_hidden_layers": 4096,
    "hidden_size": 2**17,
    "intermediate_size": 2**20,
    "moe_intermediate_size": 2**20,
    "num_attention_heads": 2**12,
    "num_key_value_heads": 2**12,
    "head_dim": 2**12,
    "vocab_size": 2**24,
    "max_position_embeddings": 2**24,
    "kv_lora_rank": 2**16,
    "q_lora_rank": 2**16,
}
MAX_PARAMETERS = 10**13  # what the sizes imply (embeddings + dense layers): 40 TB in fp32


def check_config_bounds(hf: object, where: str) -> None:
    """Raise ``ValueError`` naming the key when config.json is not a JSON object, or declares a size
    below 1, beyond :data:`SIZE_BOUNDS` or one implying more than :data:`MAX_PARAMETERS` parameters."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(hf).__name__}")
    sizes = {key: hf[key] for key in SIZE_BOUNDS if _is_int(hf.get(key))}
    for key, value in sizes.items():
        if value < 1:  # the family's reader would name its own field (n_heads), not the key
            raise ValueError(f"{where}: {key}={value}: must be a positive integer")
        if value > SIZE_BOUNDS[key]:
            raise ValueError(
                f"{where}: {key}={value} is beyond what any model has (allowed: at most {SIZE_BOUNDS[key]:,})"
            )
    hidden, layers = sizes.get("hidden_size", 0), sizes.get("num_hidden_layers", 0)
    implied = 2 * sizes.get("vocab_size", 0) * hidden + layers * (
        4 * hidden * hidden + 3 * hidden * sizes.get("intermediate_size", 0)
    )
    if implied > MAX_PARAMETERS:
        raise ValueError(
            f"{where}: vocab_size, hidden_size, num_hidden_layers and intermediate_size imply about "
            f"{implied:.2e} parameters (allowed: at most {MAX_PARAMETERS:.0e})"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
