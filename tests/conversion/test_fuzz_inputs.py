"""Issue 31's fuzzer: every command, on hostile and broken inputs made from a tiny valid checkpoint, ends
in success or in one clear error line naming the file or field with a non-zero exit - never a traceback,
never an allocation beyond the cap (``capped_runner``), never a partial output, never unpickled code.

Each example damages one thing (``hostile_inputs``); hypothesis shrinks a failure to the smallest damage.
CI replays a fixed set of examples (``derandomize``, tests/conftest.py); a longer random run is
``python -m benchmarks.fuzz_inputs --examples 2000``.
"""

from __future__ import annotations

import itertools
import math
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conversion.capped_runner import CappedRunner
from tests.conversion.hostile_inputs import (
    COMMANDS,
    config_field,
    config_nested,
    file_set,
    header_field,
    non_finite,
    try_case,
    write_base_gguf,
    write_base_model,
)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is Linux's")
# Cases per command: the whole file (~400 cases, most refused within milliseconds) takes about 35 s on 2
# shared cores, 8 s of it the worker's start-up.
EXAMPLES = 40
_ids = itertools.count()


class HypothesisDraw:
    def __init__(self, data) -> None:
        self.data = data

    def choice(self, options):
        return self.data.draw(st.sampled_from(options))

    def integer(self, low, high):
        return self.data.draw(st.integers(low, high))


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-base")
    return write_base_model(root / "model"), write_base_gguf(root / "model.gguf")


@pytest.fixture(scope="module")
def runner():
    runner = CappedRunner()
    yield runner
    runner.close()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_hostile_inputs_cleanly(command, bases, runner, tmp_path_factory):
    root = tmp_path_factory.mktemp(command.replace(" ", "_").replace("-", ""))

    def fuzz(data):
        work = root / f"case-{next(_ids)}"
        expected, outcome, problems = try_case(command, bases, runner, work, HypothesisDraw(data))
        assert not problems, f"{command} on {expected.what}: {problems}\n{outcome.error_line}"

    # derandomized (CI) examples are seeded from the function's name: one stream of cases per command
    fuzz.__name__ = fuzz.__qualname__ = f"fuzz_{command.replace(' ', '_').replace('-', '')}"
    settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )(given(data=st.data())(fuzz))()


class ScriptedDraw:
    """Replays a fixed sequence of choices: the cases the fuzzer once found, kept as regressions."""

    def __init__(self, choices) -> None:
        self.choices = iter(choices)

    def choice(self, options):
        value = next(self.choices)
        assert any(value is option or value == option for option in options), (value, options)
        return value

    def integer(self, low, high):
        value = next(self.choices)
        assert low <= value <= high
        return value


NAN_IN_WEIGHTS = [non_finite, "model.layers.2.mlp.up_proj.weight", 5, math.nan]
# name -> (command, its choices): each was refused without the invariant (a traceback, a hang, exit 0 on
# NaN weights, an error naming neither key nor file) before its fix; now a clean refusal.
FOUND = {
    "config nested past the recursion limit": ("inspect", [config_nested, 100_000, None]),
    "GGUF declaring more layers than it holds (hung)": (
        "import",
        ["metadata value", "llama.block_count", 1000],
    ),
    "GGUF transformers refuses (its own exception type)": (
        "import",
        ["metadata value", "llama.attention.head_count", 3],
    ),
    "heads not dividing the width (transformers' exception)": (
        "train",
        [config_field, "num_attention_heads", 7],
    ),
    "empty tokenizer.json": ("eval", [file_set, "empty tokenizer"]),
    "empty tokenizer.json into a GGUF": ("export --format gguf", [file_set, "empty tokenizer"]),
    "NaN weights exported": ("export", NAN_IN_WEIGHTS),
    "NaN weights as train's init_from": ("train", NAN_IN_WEIGHTS),
    "a config size below 1": ("inspect --config-only", [config_field, "num_attention_heads", 0]),
    "a ModelConfig check naming its own field": ("inspect --config-only", [config_field, "rms_norm_eps", -1]),
    "legacy rope_scaling not an object": ("generate", [config_field, "rope_scaling", [[[1]]]]),
    "config sizes the weights disagree with (train)": ("train", [config_field, "intermediate_size", 1]),
    "a pickle that runs code, --allow-pickle (a multi-line error)": (
        "export --allow-pickle",
        [file_set, "only a pickle that runs code"],
    ),
    "a GGUF array count of 3e9 in a 300 kB file (hung in gguf's reader)": (
        "import",
        ["header bytes", 1, 1571, 178],
    ),
    "a GGUF tokenizer model transformers cannot convert": ("import", ["header bytes", 1, 536, 97]),
    "a negative bos id into a GGUF": ("export --format gguf", [config_field, "bos_token_id", -1]),
    "integer weights (perplexity overflowed)": (
        "eval",
        [header_field, "model.embed_tokens.weight", "dtype", "I32"],
    ),
}


@pytest.mark.parametrize(("command", "choices"), FOUND.values(), ids=FOUND)
def test_what_the_fuzzer_found_stays_fixed(command, choices, bases, runner, tmp_path):
    expected, outcome, problems = try_case(command, bases, runner, tmp_path / "case", ScriptedDraw(choices))
    assert not problems, f"{command} on {expected.what}: {problems}\n{outcome.error_line}"
    assert outcome.rc != 0


def test_several_eos_ids_now_generate(bases, runner, tmp_path):
    """The fuzzer found `generate` crashing on `eos_token_id: [1, 2]` (then a clean refusal); Llama-3 and
    Qwen list several end ids, so generate now stops at any of them."""
    choices = [config_field, "eos_token_id", [1, 2]]
    _, outcome, problems = try_case("generate", bases, runner, tmp_path / "case", ScriptedDraw(choices))
    assert not problems and outcome.rc == 0, outcome.error_line


def test_a_config_value_only_transformers_reads_does_not_break_the_tokenizer(bases, runner, tmp_path):
    """AutoTokenizer builds config.json with transformers unless given a config: it gets its model_type's
    default, so `layer_types=-1`, which no Llama reader looks at, no longer fails eval's tokenizer."""
    choices = [config_field, "layer_types", -1]
    _, outcome, problems = try_case("eval", bases, runner, tmp_path / "case", ScriptedDraw(choices))
    assert not problems and outcome.rc == 0, outcome.error_line
