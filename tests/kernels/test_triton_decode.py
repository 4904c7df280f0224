"""The Triton split-KV decode kernel (GQA and absorbed MLA) equals its references; on CPU it runs in
Triton's interpreter, so CI covers the kernel without a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")  # on CPU, tests/conftest.py has switched Triton to its interpreter

from kvforge.arch import CausalLM, KVView, generate
from kvforge.kernels import auto as auto_module
from kvforge.kernels.attention import attention
from kvforge.kernels.triton_decode import decode_attention, value_is_key_prefix
from tests.conftest import tiny_form

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_splits", [1, 3])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "head_dim"), [(8, 2, 16), (8, 1, 28), (4, 4, 8)])
def test_decode_kernel_equals_eager_over_the_filled_prefix(n_heads, n_kv_heads, head_dim, window, n_splits):
    # 40 slots, rows filled to 40, 17 and 1 (a window longer than a row's fill sees all of it).
    q = torch.randn(3, 1, n_heads, head_dim, device=DEVICE)
    k = torch.randn(3, 40, n_kv_heads, head_dim, device=DEVICE)
    v = torch.randn(3, 40, n_kv_heads, head_dim, device=DEVICE)
    kv_lens = torch.tensor([40, 17, 1], device=DEVICE)
    out = decode_attention(q, k, v, scale=head_dim**-0.5, window=window, kv_lens=kv_lens, n_splits=n_splits)
    for row, filled in enumerate(kv_lens.tolist()):
        sl = slice(row, row + 1)
        expected = attention(q[sl], k[sl, :filled], v[sl, :filled], window=window, backend="eager")
        torch.testing.assert_close(out[sl], expected, **TOL)


def test_decode_kernel_without_lengths_attends_to_every_slot():
    q, k, v = (torch.randn(2, n, 4, 16, device=DEVICE) for n in (1, 23, 23))
    expected = attention(q, k, v, backend="eager")
    torch.testing.assert_close(attention(q, k, v, backend="triton"), expected, **TOL)


def test_mla_latent_rows_are_read_once_as_key_and_value():
    latent = torch.randn(2, 9, 32 + 8)
    assert value_is_key_prefix(latent.unsqueeze(2), latent[..., :32].unsqueeze(2))
    assert not value_is_key_prefix(latent.unsqueeze(2), latent[..., :32].clone().unsqueeze(2))


@pytest.mark.parametrize("filled", [None, 11])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize(("kv_lora_rank", "rope_heads"), [(32, 1), (24, 1), (24, 2)])
def test_absorbed_mla_decode_with_triton_equals_expanded(kv_lora_rank, rope_heads, window, filled):
    # kv_lora_rank 32: V reuses the key tile; 24: V loaded separately; rope_heads 2: two latent "KV heads".
    config = tiny_form("mla", mla_rope_heads=rope_heads).replace(kv_lora_rank=kv_lora_rank)
    attn = CausalLM(config).model.layers[0].self_attn.to(DEVICE)
    q_nope = torch.randn(2, 1, 8, config.qk_nope_head_dim, device=DEVICE)
    q_pe = torch.randn(2, 1, 8, config.qk_rope_head_dim, device=DEVICE)
    latent = torch.randn(2, 16, attn.cache_features()[0][0], device=DEVICE)
    kv_lens = None if filled is None else torch.tensor([filled], device=DEVICE)
    kv = KVView((latent,), causal=True, window=window, kv_lens=kv_lens)
    with torch.no_grad():
        expanded = attn.expanded(q_nope, q_pe, kv)
        attn.backend = "triton"
        absorbed = attn.absorbed(q_nope, q_pe, kv)
    torch.testing.assert_close(absorbed, expanded, **TOL)


@pytest.mark.parametrize("form", ["mla", "mix"])  # mix: MLA, windowed GQA and both kinds of shared K/V
def test_static_generation_with_auto_choosing_triton_for_decode_equals_uncached(form, monkeypatch):
    # Route every one-token step through the kernel via the same table `auto` reads on a GPU.
    rows = [
        {"device": DEVICE, "dtype": "*", "case": "*", "min_keys": 0, "order": ["sdpa"], "source": "test"},
        {
            "device": DEVICE,
            "dtype": "*",
            "case": "decode",
            "min_keys": 0,
            "order": ["triton"],
            "source": "test",
        },
    ]
    monkeypatch.setattr(auto_module, "load_table", lambda: rows)
    model = CausalLM(tiny_form(form)).to(DEVICE).eval()
    prompt = torch.randint(0, 97, (2, 4), device=DEVICE)
    expected = generate(model, prompt, 8, use_cache=False)  # 4 + 8 > window 5: the rings wrap
    assert torch.equal(generate(model, prompt, 8, static=True), expected)
