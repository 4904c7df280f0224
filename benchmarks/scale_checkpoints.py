"""Random-weight Hugging Face Llama checkpoints of real shapes, written one shard at a time.

Each tensor is drawn with a fixed seed per tensor name (std 0.02, norms one), cast to the stored
dtype and saved with its shard; only one shard is in memory. Shapes are named by their parameter
count; ``SHAPES`` is the table the scale benchmarks share.

    PYTHONPATH=. python -m benchmarks.scale_checkpoints 0.95b /tmp/kvforge-scale/0.95b
"""

from __future__ import annotations

import argparse
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Shape:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = 32000
    max_seq_len: int = 4096
    shards: int = 2

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """HF Llama names and shapes, in file order."""
        d, kv = self.d_model, self.n_kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab_size, d)}
        for i in range(self.n_layers):
            p = f"model.layers.{i}."
            shapes |= {
                p + "input_layernorm.weight": (d,),
                p + "self_attn.q_proj.weight": (d, d),
                p + "self_attn.k_proj.weight": (kv, d),
                p + "self_attn.v_proj.weight": (kv, d),
                p + "self_attn.o_proj.weight": (d, d),
                p + "post_attention_layernorm.weight": (d,),
                p + "mlp.gate_proj.weight": (self.ffn_dim, d),
                p + "mlp.up_proj.weight": (self.ffn_dim, d),
                p + "mlp.down_proj.weight": (d, self.ffn_dim),
            }
        return shapes | {"model.norm.weight": (d,), "lm_head.weight": (self.vocab_size, d)}

    @property
    def parameters(self) -> int:
        return sum(torch.Size(s).numel() for s in self.tensors().values())

    def hf_config(self, dtype: torch.dtype) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "intermediate_size": self.ffn_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "dtype": str(dtype).removeprefix("torch."),
        }


SHAPES = {
    "0.27b": Shape(n_layers=16, d_model=1024, n_heads=16, n_kv_heads=16, ffn_dim=2816),
    "0.95b": Shape(n_layers=16, d_model=2048, n_heads=16, n_kv_heads=16, ffn_dim=5632),
    "8b": Shape(
        n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, ffn_dim=14336, vocab_size=128256, shards=4
    ),
}


def _draw(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    std = 0.02 if len(shape) == 2 and "embed" not in name else 1.0 / shape[-1] ** 0.5
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def write_checkpoint(shape: Shape, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``shape`` as a sharded HF Llama directory (skipped when a complete one is already there)."""
    out = Path(out)
    index_file = out / "model.safetensors.index.json"
    if index_file.is_file() and (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    names = list(shape.tensors().items())
    per_shard = -(-len(names) // shape.shards)
    weight_map, total = {}, 0
    for number in range(shape.shards):
        filename = f"model-{number + 1:05d}-of-{shape.shards:05d}.safetensors"
        part = {
            name: _draw(name, size, dtype)
            for name, size in names[number * per_shard : (number + 1) * per_shard]
        }
        save_file(part, out / filename, {"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in part.values())
        weight_map |= dict.fromkeys(part, filename)
        del part
    (out / "config.json").write_text(json.dumps(shape.hf_config(dtype), indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    index_file.write_text(json.dumps(index, indent=2) + "\n")
    return out


def checkpoint_bytes(directory: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out")
    args = parser.parse_args()
    out = write_checkpoint(SHAPES[args.shape], args.out)
    print(
        f"{out}: {SHAPES[args.shape].parameters / 1e9:.3f}B parameters, {checkpoint_bytes(out) / 2**30:.2f} GiB"
    )


if __name__ == "__main__":
    main()
