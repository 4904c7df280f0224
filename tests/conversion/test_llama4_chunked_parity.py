"""Chunked local layers and NoPE global layers compute what transformers' Llama 4 text model computes
(attention_chunk_size, no_rope_layers) on a tiny dense random model: logits ≤ 1e-4 in fp32 and
greedy generation (cached, across chunk boundaries) token for token."""

from __future__ import annotations

import torch
import transformers

from kvforge.arch import CausalLM, LayerSpec, generate
from tests.conftest import tiny_base

CHUNK = 4
HEAD_DIM = 8


def _pair_order(head_dim: int) -> torch.Tensor:
    """Llama 4 rotates interleaved pairs (2i, 2i+1); kvforge rotates halves (i, i + d/2)."""
    half = torch.arange(head_dim // 2)
    return torch.stack((half, half + head_dim // 2), dim=1).flatten()


def _twins():
    hf_config = transformers.Llama4TextConfig(
        vocab_size=101,
        hidden_size=64,
        intermediate_size=96,
        intermediate_size_mlp=96,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attention_chunk_size=CHUNK,
        no_rope_layer_interval=4,  # layer 3 is global NoPE, layers 0-2 chunked with RoPE
        moe_layers=[],
        use_qk_norm=False,
        attn_temperature_tuning=False,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.Llama4ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)  # not all ones: a mixed-up norm must show
    pattern = [LayerSpec(chunk=CHUNK)] * 3 + [LayerSpec(rope=False)]
    # tiny_base's shape (64 wide, 4 layers of 8 heads, 64 positions) with the twin's vocabulary and K/V heads
    config = tiny_base(
        vocab_size=101, n_kv_heads=2, head_dim=HEAD_DIM, ffn_dim=96, init_std=0.02, pattern=pattern
    )
    model = CausalLM(config).eval()
    order = _pair_order(HEAD_DIM)
    state = {}
    for name, tensor in hf.state_dict().items():
        name = name.replace(".feed_forward.", ".mlp.")
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            rows = tensor.view(-1, HEAD_DIM, tensor.shape[-1])
            tensor = rows[:, torch.argsort(order)].reshape(tensor.shape)
        state[name] = tensor
    model.load_state_dict(state)
    return hf, model


def test_chunked_nope_logits_equal_transformers_llama4():
    hf, model = _twins()
    ids = torch.randint(0, 101, (2, 19))
    with torch.no_grad():
        expected = hf(ids).logits
        torch.testing.assert_close(model(ids), expected, rtol=0, atol=1e-4)
    assert ids.shape[1] > CHUNK  # several chunks: chunking really hides keys


def test_chunked_nope_generation_equals_transformers_llama4():
    hf, model = _twins()
    prompt = torch.randint(3, 101, (1, 6))
    expected = hf.generate(prompt, max_new_tokens=14, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(generate(model, prompt, 14), expected)
