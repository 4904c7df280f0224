"""Static-cache decoding: the fixed-shape step (CUDA-graph captured on GPU) generates exactly what
uncached generation does, and nothing in a step changes with the position (shapes, host numbers) or
waits on the device - the properties that make the step capturable."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from kvforge.arch import CausalLM, StaticDecoder, generate, kv_cache_bytes
from kvforge.arch.presets import PRESETS
from tests.conftest import tiny_form

HOST_SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.item")


@pytest.mark.parametrize("form", PRESETS)
def test_static_generation_equals_uncached_generation(form):
    model = CausalLM(tiny_form(form)).eval()
    prompt = torch.randint(0, 97, (2, 4))
    expected = generate(model, prompt, 20, use_cache=False)  # 24 tokens: the window-5 rings wrap
    assert torch.equal(generate(model, prompt, 20, static=True), expected)


def test_static_sampling_equals_dynamic_sampling():
    model = CausalLM(tiny_form("mix")).eval()
    prompt = torch.randint(0, 97, (3, 5))
    options = dict(temperature=0.8, top_k=20, top_p=0.9)
    dynamic = generate(model, prompt, 16, generator=torch.Generator().manual_seed(7), **options)
    static = generate(model, prompt, 16, static=True, generator=torch.Generator().manual_seed(7), **options)
    assert torch.equal(static, dynamic)


def test_static_generation_stops_at_eos_exactly_like_dynamic():
    # EOS is checked every 16 tokens on the static path; the result is trimmed to the same length.
    model = CausalLM(tiny_form("gqa")).eval()
    prompt = torch.randint(0, 97, (1, 4))
    greedy = generate(model, prompt, 24, use_cache=False)
    eos = int(greedy[0, 4 + 6])
    dynamic = generate(model, prompt, 24, eos_token_id=eos)
    assert dynamic.shape[1] < greedy.shape[1]
    assert torch.equal(generate(model, prompt, 24, eos_token_id=eos, static=True), dynamic)


def test_any_of_several_eos_ids_ends_a_row_and_the_row_repeats_its_own():
    """Llama-3 and Qwen configs list several end ids: each row stops at the first of any of them (as
    transformers' generate does), keeps repeating the one it emitted, and static decode agrees."""
    model = CausalLM(tiny_form("gqa")).eval()
    prompt = torch.randint(0, 97, (2, 4))
    greedy = generate(model, prompt, 24, use_cache=False)
    first, second = int(greedy[0, 4 + 3]), int(greedy[1, 4 + 9])
    stops = [first, second]
    out = generate(model, prompt, 24, eos_token_id=stops)
    ends = []
    for row in range(2):
        new = greedy[row, 4:].tolist()
        end = min(i for i, token in enumerate(new) if token in stops)
        ends.append(end)
        assert out[row, 4 : 4 + end + 1].tolist() == new[: end + 1]
        assert (out[row, 4 + end :] == new[end]).all()  # its own stop id, repeated
    assert out.shape[1] == 4 + max(ends) + 1
    assert torch.equal(generate(model, prompt, 24, eos_token_id=stops, static=True), out)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, prompt, 4, eos_token_id=[])


def test_one_decoder_serves_prompts_of_different_lengths():
    model = CausalLM(tiny_form("swa")).eval()
    decoder = StaticDecoder(model, batch=2, max_len=40)
    for prompt_len in (9, 3):  # the second prompt is shorter: stale slots must stay masked
        prompt = torch.randint(0, 97, (2, prompt_len))
        expected = generate(model, prompt, 12, use_cache=False)
        assert torch.equal(generate(model, prompt, 12, decoder=decoder), expected)


@pytest.mark.parametrize("form", PRESETS)
def test_static_cache_bytes_match_formula(form):
    config = tiny_form(form)
    decoder = StaticDecoder(CausalLM(config), batch=3, max_len=40, dtype=torch.bfloat16)
    assert decoder.cache.nbytes() == kv_cache_bytes(config, 40, torch.bfloat16, batch=3)


class _OpRecorder(TorchDispatchMode):
    """Every aten op a step runs, with its tensor shapes and its non-tensor arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        leaves = tree_leaves((args, kwargs or {}))
        shapes = tuple(tuple(leaf.shape) for leaf in leaves if isinstance(leaf, torch.Tensor))
        scalars = tuple(repr(leaf) for leaf in leaves if not isinstance(leaf, torch.Tensor))
        self.calls.append((str(func), shapes, scalars))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("form", ["gqa", "mla", "swa", "mix"])
def test_a_static_step_is_the_same_program_at_every_position(form):
    decoder = StaticDecoder(CausalLM(tiny_form(form)).eval(), batch=2, max_len=32)
    decoder.prefill(torch.randint(0, 97, (2, 3)))
    recorded = []
    for position in range(3, 12):  # crosses the window-5 ring wrap
        recorder = _OpRecorder()
        with recorder:
            decoder.step(torch.randint(0, 97, (2,)))
        if position in (4, 11):
            recorded.append(recorder.calls)
    assert recorded[0] == recorded[1]
    assert not [call for call in recorded[0] if call[0].startswith(HOST_SYNC_OPS)]


def test_cuda_graph_on_a_cpu_model_is_a_clear_error():
    with pytest.raises(ValueError, match="cuda_graph=True needs the model on a CUDA device"):
        StaticDecoder(CausalLM(tiny_form("gqa")), batch=1, max_len=8, cuda_graph=True)


def _captured_generation_equals_uncached(form: str, compile: bool) -> None:
    model = CausalLM(tiny_form(form)).cuda().eval()
    prompt = torch.randint(0, 97, (2, 4), device="cuda")
    expected = generate(model, prompt, 20, use_cache=False)
    decoder = StaticDecoder(model, batch=2, max_len=24, cuda_graph=True, compile=compile)
    assert torch.equal(generate(model, prompt, 20, decoder=decoder), expected)
    assert decoder.graph is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("form", PRESETS)
def test_captured_decode_step_equals_uncached_generation(form):
    _captured_generation_equals_uncached(form, compile=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_and_captured_decode_step_equals_uncached_generation():
    _captured_generation_equals_uncached("mix", compile=True)  # mix: MLA, windowed GQA, shared K/V
