"""Hostile and broken inputs made from a tiny valid checkpoint, one damage at a time, and the kvforge
command lines that read them (issue 31's fuzzer: ``test_fuzz_inputs.py``, ``benchmarks/fuzz_inputs.py``).

A case is one damage to a copy of a valid model directory (a Llama of hf_tiny's sizes with a byte-level
tokenizer) or of a valid GGUF file: a config.json field mistyped, out of range, missing, extra or nested;
the config not an object; a safetensors header entry's dtype, shape or byte range changed, its length
prefix or JSON broken, the file cut short or NaN written into it; pickles, symlinks (dangling, looping,
leaving the directory), shard indexes naming paths outside the directory, empty files; a GGUF cut short,
with metadata or a tensor's dims rewritten. Each damage says whether every command must refuse it and
which words (the file, the key, the tensor) an error about it must contain.

Choices come from a :class:`Draw`: hypothesis's ``data.draw`` in the tests (so failures shrink), a seeded
``random.Random`` in the benchmark.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tests.conversion.capped_runner import TRAIN, CappedRunner, Expectation, Outcome, outcome_problems

T = TypeVar("T")
# A config value the weights disagree with may be named through the tensors it gives the wrong shapes.
SHAPE_ERRORS = ("wrong shapes: ", "missing tensors: ", "unexpected tensors: ")
# config.json keys -> the ModelConfig field read from them (an error about the model may name that)
FIELDS = {
    "hidden_size": "d_model",
    "intermediate_size": "ffn_dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "norm_eps",
}
SAFETENSORS, CONFIG, INDEX = "model.safetensors", "config.json", "model.safetensors.index.json"
MARKER = "UNPICKLED"  # a pickle's payload touches this file: it must never exist
# Values a JSON field may hold that no field should: wrong types, signs, sizes, nesting.
HOSTILE_VALUES: tuple[Any, ...] = (
    -1,
    0,
    1,
    7,
    10**9,
    2**63,
    -(2**31),
    1.5,
    1e308,
    math.nan,
    math.inf,
    "64",
    "",
    None,
    True,
    [],
    [1, 2],
    [[[1]]],
    {},
    {"a": [1, {"b": None}]},
)
CONFIG_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "rope_theta",
    "tie_word_embeddings",
    "bos_token_id",
    "eos_token_id",
    "attention_bias",
    "hidden_act",
    "sliding_window",
    "layer_types",
    "rope_scaling",
    "torch_dtype",
)
TENSORS = (
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.2.mlp.up_proj.weight",
    "model.norm.weight",
)
GGUF_U32_KEYS = (
    "llama.block_count",
    "llama.context_length",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.dimension_count",
)
GGUF_U32_VALUES = (0, 1, 3, 1000, 10**9, 2**32 - 1)


class Draw(Protocol):
    def choice(self, options: Sequence[T]) -> T: ...
    def integer(self, low: int, high: int) -> int: ...


# ----------------------------------------------------------------------------- the valid inputs
def write_base_model(directory: Path) -> Path:
    """A valid Llama directory (hf_tiny's sizes, tied embeddings) with a tokenizer, written by transformers."""
    from tests.conversion.gguf_files import write_tokenizer
    from tests.conversion.hf_tiny import save_hf_model

    save_hf_model("llama", directory)
    write_tokenizer(directory)
    return directory


def write_base_gguf(path: Path) -> Path:
    from tests.conversion.gguf_files import tiny_llama, write_llama_gguf

    return write_llama_gguf(path, tiny_llama())


def write_text(path: Path) -> Path:
    path.write_text("the cat and the dog sat on the mat. " * 20)
    return path


# ----------------------------------------------------------------------------- config.json
def _edit_config(model: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((model / CONFIG).read_text())
    change(config)
    (model / CONFIG).write_text(json.dumps(config))


def config_field(model: Path, draw: Draw) -> Expectation:
    key, value = draw.choice(CONFIG_KEYS), draw.choice(HOSTILE_VALUES)
    _edit_config(model, lambda config: config.__setitem__(key, value))
    return Expectation(f"config.json {key}={value!r}", names=(key, FIELDS.get(key, key), *SHAPE_ERRORS))


def config_missing(model: Path, draw: Draw) -> Expectation:
    key = draw.choice(CONFIG_KEYS[:12])
    _edit_config(model, lambda config: config.pop(key, None))
    return Expectation(f"config.json without {key}", names=(key, CONFIG, *SHAPE_ERRORS))


def config_extra(model: Path, draw: Draw) -> Expectation:
    value = draw.choice(HOSTILE_VALUES)
    _edit_config(model, lambda config: config.__setitem__("fuzz_extra_key", value))
    return Expectation(f"config.json with an extra key = {value!r}", names=("fuzz_extra_key",))


def config_nested(model: Path, draw: Draw) -> Expectation:
    depth, key = draw.choice((10, 1000, 100_000)), draw.choice((None, *CONFIG_KEYS[:6]))
    nested = "[" * depth + "]" * depth
    text = (model / CONFIG).read_text()
    if key is None:
        (model / CONFIG).write_text(nested)
        return Expectation(f"config.json is a list nested {depth} deep", must_fail=True, names=(CONFIG,))
    (model / CONFIG).write_text(text.replace("{", f'{{"{key}": {nested}, ', 1))
    return Expectation(f"config.json {key}=<list nested {depth} deep>", names=(key, CONFIG))


WHOLE_CONFIGS = (
    "[1, 2, 3]",
    '"a string"',
    "42",
    "null",
    "{",
    "",
    '{"model_type": 5}',
    '{"model_type": "no-such-family"}',
    '{"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "evil.Model"}}',
)


def config_replaced(model: Path, draw: Draw) -> Expectation:
    text = draw.choice((*WHOLE_CONFIGS, b"\xff\xfe{}"))
    if isinstance(text, bytes):
        (model / CONFIG).write_bytes(text)
    else:
        (model / CONFIG).write_text(text)
    return Expectation(f"config.json is {text!r}", must_fail=True, names=(CONFIG,))


# ----------------------------------------------------------------------------- safetensors
def _header(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write(path: Path, header: object, body: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


FIELD_VALUES = {
    "dtype": ("F8_E4M3X", "I32", "F16", "BOOL", "U64", "f32", 5),
    "shape": ([], [-1, 64], [10**6, 10**6], [2**62, 2**62, 16], ["64"], [64, 101], [101, 64, 1], [0, 64]),
    "data_offsets": ([0, 10**12], [25856, 0], [-8, 25848], [0], "0-10", [0, 25855], [2**64, 2**64 + 4]),
}


def header_field(model: Path, draw: Draw) -> Expectation:
    name, key = draw.choice(TENSORS), draw.choice(tuple(FIELD_VALUES))
    value = draw.choice((*FIELD_VALUES[key], *HOSTILE_VALUES[:8], "<deleted>"))
    header, body = _header(model / SAFETENSORS)
    if value == "<deleted>":
        del header[name][key]
    else:
        header[name][key] = value
    _write(model / SAFETENSORS, header, body)
    return Expectation(f"{name} {key}={value!r}", names=(SAFETENSORS, name))


def header_entry(model: Path, draw: Draw) -> Expectation:
    name, value = draw.choice((*TENSORS, "__metadata__")), draw.choice(HOSTILE_VALUES)
    header, body = _header(model / SAFETENSORS)
    header[name] = value
    _write(model / SAFETENSORS, header, body)
    return Expectation(
        f"safetensors header {name}={value!r}", must_fail=name != "__metadata__", names=(SAFETENSORS,)
    )


def header_bytes(model: Path, draw: Draw) -> Expectation:
    path = model / SAFETENSORS
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    how = draw.choice(("length 0", "length huge", "length past the end", "length short", "not json", "list"))
    if how.startswith("length"):
        value = {"length 0": 0, "length huge": 2**64 - 1, "length past the end": len(data), "length short": 7}
        path.write_bytes(struct.pack("<Q", value[how]) + data[8:])
    else:
        encoded = b"\xff\xfe not json" if how == "not json" else b"[1, 2]"
        path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data[8 + length :])
    return Expectation(f"safetensors header: {how}", must_fail=True, names=(SAFETENSORS,))


def header_flips(model: Path, draw: Draw) -> Expectation:
    """A few random bytes of the JSON header overwritten (any value): whatever it parses to."""
    path = model / SAFETENSORS
    data = bytearray(path.read_bytes())
    length = struct.unpack("<Q", data[:8])[0]
    places = [(draw.integer(8, 8 + length - 1), draw.integer(0, 255)) for _ in range(draw.integer(1, 4))]
    for at, value in places:
        data[at] = value
    path.write_bytes(bytes(data))
    return Expectation(f"safetensors header bytes {places}", names=(SAFETENSORS, *SHAPE_ERRORS))


def truncated(model: Path, draw: Draw) -> Expectation:
    path = model / SAFETENSORS
    data = path.read_bytes()
    cut = draw.integer(0, len(data) - 1)
    path.write_bytes(data[:cut])
    return Expectation(
        f"model.safetensors cut at byte {cut} of {len(data)}", must_fail=True, names=(SAFETENSORS,)
    )


def non_finite(model: Path, draw: Draw) -> Expectation:
    path = model / SAFETENSORS
    header, body = _header(path)
    name = draw.choice(TENSORS)
    begin, end = header[name]["data_offsets"]
    at = begin + 4 * draw.integer(0, (end - begin) // 4 - 1)
    value = draw.choice((math.nan, math.inf, -math.inf))
    _write(path, header, body[:at] + struct.pack("<f", value) + body[at + 4 :])
    return Expectation(f"{name} holds {value}", must_fail=True, names=(SAFETENSORS, name))


# ----------------------------------------------------------------------------- file sets
class _Payload:
    """Unpickling this touches MARKER: a loader that runs pickled code leaves the file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def file_set(model: Path, draw: Draw) -> Expectation:
    import torch
    from safetensors.torch import load_file

    how = draw.choice(
        (
            "pickle beside",
            "only a pickle",
            "only a pickle that runs code",
            "no weights",
            "weights are a directory",
            "dangling symlink",
            "symlink loop",
            "symlink outside the directory",
            "symlink to /dev/zero",
            "empty weights",
            "empty config",
            "empty tokenizer",
            "config is a directory",
        )
    )
    weights, outside = model / SAFETENSORS, model.parent / f"outside-{model.name}.safetensors"
    must_fail = how not in ("pickle beside", "symlink outside the directory", "empty tokenizer")
    if how in ("pickle beside", "only a pickle"):
        torch.save(load_file(weights), model / "pytorch_model.bin")
    elif how == "only a pickle that runs code":
        torch.save({"x": _Payload(model.parent / MARKER)}, model / "pytorch_model.bin")
    if how.startswith("only a pickle") or how in ("no weights", "weights are a directory", "empty weights"):
        weights.unlink()
    if how == "weights are a directory":
        weights.mkdir()
    elif how == "empty weights":
        weights.write_bytes(b"")
    elif how.endswith("symlink") or how.startswith("symlink"):
        shutil.move(weights, outside)
        target = {
            "dangling symlink": model / "gone.safetensors",
            "symlink loop": weights,
            "symlink outside the directory": outside,
            "symlink to /dev/zero": Path("/dev/zero"),
        }[how]
        os.symlink(target, weights)
    elif how == "empty config":
        (model / CONFIG).write_text("")
    elif how == "empty tokenizer":
        (model / "tokenizer.json").write_text("")
    elif how == "config is a directory":
        (model / CONFIG).unlink()
        (model / CONFIG).mkdir()
    names = (CONFIG,) if "config" in how else (SAFETENSORS, "pytorch_model.bin", str(model))
    return Expectation(how, must_fail=must_fail, names=(*names, "tokenizer"))


SHARD_NAMES = (
    "../outside.safetensors",
    "/etc/passwd",
    "sub/../../outside.safetensors",
    "C:\\weights.safetensors",
    "",
    5,
    None,
    ["model.safetensors"],
    "link.safetensors",
    "gone.safetensors",
)


def shard_index(model: Path, draw: Draw) -> Expectation:
    header, _ = _header(model / SAFETENSORS)
    name, shard = draw.choice(TENSORS), draw.choice(SHARD_NAMES)
    shutil.copy(model / SAFETENSORS, model.parent / "outside.safetensors")
    os.symlink(model.parent / "outside.safetensors", model / "link.safetensors")
    weight_map: Any = {tensor: SAFETENSORS for tensor in header if tensor != "__metadata__"}
    weight_map[name] = shard
    index = draw.choice(({"weight_map": weight_map}, {"weight_map": list(weight_map)}, weight_map, []))
    (model / INDEX).write_text(json.dumps(index))
    return Expectation(
        f"shard index {name} -> {shard!r} ({type(index).__name__})", must_fail=True, names=(INDEX,)
    )


def nothing(model: Path, draw: Draw) -> Expectation:
    """The control: every command must succeed on the valid input."""
    return Expectation("the valid model, untouched")


DIRECTORY_DAMAGE = (
    nothing,
    config_field,
    config_missing,
    config_extra,
    config_nested,
    config_replaced,
    header_field,
    header_entry,
    header_bytes,
    header_flips,
    truncated,
    non_finite,
    file_set,
    shard_index,
)


# ----------------------------------------------------------------------------- GGUF
def gguf_damage(path: Path, draw: Draw) -> Expectation:
    data = bytearray(path.read_bytes())
    how = draw.choice(
        ("untouched", "cut short", "metadata value", "tensor dims", "counts", "architecture", "header bytes")
    )
    must_fail = how in ("cut short", "counts")
    if how == "cut short":
        cut = draw.integer(0, len(data) - 1)
        del data[cut:]
        how = f"cut at byte {cut} of {len(path.read_bytes())}"
    elif how == "metadata value":  # key, then its type (u32 = 4), then the value
        key, value = draw.choice(GGUF_U32_KEYS), draw.choice(GGUF_U32_VALUES)
        at = data.find(key.encode() + struct.pack("<I", 4)) + len(key) + 4
        data[at : at + 4] = struct.pack("<I", value)
        how = f"{key}={value}"
    elif how == "tensor dims":  # name, then n_dims (u32), then the dims (u64 each)
        name = draw.choice(("token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"))
        value = draw.choice((0, 1, 2**31, 2**40, 2**63))
        at = data.find(name.encode() + b"\x01\x00\x00\x00") + len(name) + 4
        at = data.find(name.encode() + b"\x02\x00\x00\x00") + len(name) + 4 if at < len(name) + 4 else at
        data[at : at + 8] = struct.pack("<Q", value)
        how = f"{name} dims[0]={value}"
    elif how == "counts":  # magic, version, tensor count, metadata count
        which, value = draw.choice((8, 16)), draw.choice((0, 10**6, 2**63))
        data[which : which + 8] = struct.pack("<Q", value)
        must_fail = value != 0 or which == 8
        how = f"{'tensor' if which == 8 else 'metadata'} count {value}"
    elif how == "header bytes":  # metadata and tensor infos fill the first few kB
        places = [(draw.integer(4, 4095), draw.integer(0, 255)) for _ in range(draw.integer(1, 4))]
        for at, value in places:
            data[at] = value
        how = f"header bytes {places}"
    elif how == "architecture":
        at = data.find(b"llama")
        data[at : at + 5] = draw.choice((b"llamb", b"\x00lama", b"qwen2"))
        how = "architecture renamed"
    path.write_bytes(bytes(data))
    return Expectation(f"GGUF {how}", must_fail=must_fail, names=(path.name,))


# ----------------------------------------------------------------------------- commands
def command_line(command: str, source: Path, out: Path, text: Path) -> list[str]:
    """The argv that runs ``command`` on ``source`` (a model directory, or a GGUF file for import)."""
    src = str(source)
    return {
        "inspect": ["inspect", src],
        "inspect --config-only": ["inspect", src, "--config-only"],
        "convert": ["convert", src, str(out), "--to", "mqa", "--calib", "none", "--device", "cpu"],
        "export": ["export", src, str(out)],
        "export --allow-pickle": ["export", src, str(out), "--allow-pickle"],
        "export --format gguf": ["export", src, str(out) + ".gguf", "--format", "gguf"],
        "eval": [
            "eval",
            src,
            "--text",
            str(text),
            "--tasks",
            "perplexity",
            "--context",
            "16",
            "--max-tokens",
            "48",
            "--out",
            str(out),
            "--no-plots",
            "--device",
            "cpu",
        ],
        "generate": ["generate", src, "--prompt", "the", "--max-new-tokens", "2", "--device", "cpu"],
        "import": ["import", src, str(out)],
        TRAIN: [TRAIN, src],
    }[command]


COMMANDS = (
    "inspect",
    "inspect --config-only",
    "convert",
    "export",
    "export --allow-pickle",
    "export --format gguf",
    "eval",
    "generate",
    "import",
    TRAIN,
)
WRITES = {
    "convert": "",
    "export": "",
    "export --allow-pickle": "",
    "export --format gguf": ".gguf",
    "import": "",
}  # command -> OUT suffix


def make_case(
    command: str, bases: tuple[Path, Path], work: Path, draw: Draw
) -> tuple[list[str], Expectation, Path]:
    """One damaged copy of the base model (or GGUF, for import) under ``work`` and the argv that reads it;
    the path the command would write (or ``work/out``)."""
    model_base, gguf_base = bases
    text = write_text(work / "text.txt")
    if command == "import":
        source = Path(shutil.copy(gguf_base, work / "model.gguf"))
        expected = gguf_damage(source, draw)
    else:
        source = shutil.copytree(model_base, work / "model")
        expected = draw.choice(DIRECTORY_DAMAGE)(source, draw)
        if command == "inspect --config-only":  # plans from config.json: damaged weights are not its business
            expected.must_fail = expected.must_fail and CONFIG in expected.names
        if command == "export --allow-pickle" and expected.what == "only a pickle":  # it asked for them
            expected.must_fail = False
    out = work / "out"
    return command_line(command, source, out, text), expected, Path(str(out) + WRITES.get(command, ""))


def try_case(
    command: str, bases: tuple[Path, Path], runner: CappedRunner, work: Path, draw: Draw
) -> tuple[Expectation, Outcome, list[str]]:
    """Make one case under ``work`` (removed afterwards), run it, and list how it broke the invariant:
    ``outcome_problems``, plus an output left by a failure (or missing after a success) and a pickle's
    code having run."""
    work.mkdir(parents=True)
    try:
        argv, expected, out = make_case(command, bases, work, draw)
        outcome = runner.run(argv)
        problems = outcome_problems(outcome, expected)
        if command in WRITES and outcome.rc is not None and (outcome.rc == 0) != out.exists():
            problems.append(f"exit {outcome.rc} but the output {'exists' if out.exists() else 'is missing'}")
        if (work / MARKER).exists():
            problems.append("a pickle's code ran")
        return expected, outcome, problems
    finally:
        shutil.rmtree(work, ignore_errors=True)
