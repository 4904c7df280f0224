"""Calibration: run a model over calibration token ids one layer at a time.

Transforms fit their new projections to what the *source* model computes on calibration text
(never the evaluation text). A :class:`LayerStream` holds the residual stream of every calibration
sequence between two layers, so a transform can read the attention inputs of layer ``l``, fit its
replacement, and advance the stream through either the source layer or the converted one
(sequential calibration: later layers are fitted on the inputs the converted model will really see).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kvforge.arch import CausalLM, ModelConfig, generate, kv_cache_bytes
from kvforge.arch.cache import KVView
from kvforge.arch.model import DecoderLayer, embedding_multiplier, rotary_embeddings
from kvforge.arch.rope import RotaryEmbedding

from .common import layer_prefix

Rope = tuple[torch.Tensor, torch.Tensor]

# Self-calibration samples at most this many bytes of KV cache at once: rows beyond it are sampled in
# further batches. 16,384 tokens of a 0.95B MHA model in bf16 would hold a 2 GiB cache in one batch.
SAMPLING_CACHE_BYTES = 768 * 2**20


def check_calibration(
    calibration: torch.Tensor | None, config: ModelConfig, what: str
) -> torch.Tensor | None:
    if calibration is None:
        return None
    if (
        not isinstance(calibration, torch.Tensor)
        or calibration.dim() != 2
        or calibration.dtype.is_floating_point
    ):
        raise ValueError(
            f"{what}: calibration must be a (batch, seq) tensor of token ids, got "
            f"{type(calibration).__name__} {tuple(getattr(calibration, 'shape', ()))}"
        )
    if calibration.shape[1] > config.max_seq_len:
        raise ValueError(
            f"{what}: calibration sequences of {calibration.shape[1]} tokens exceed max_seq_len={config.max_seq_len}"
        )
    if calibration.numel() and (calibration.min() < 0 or calibration.max() >= config.vocab_size):
        raise ValueError(f"{what}: calibration ids must be in 0..{config.vocab_size - 1}")
    return calibration


def build_model(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    streamed: Iterable[int] = (),
) -> CausalLM:
    """An eval-mode model holding ``state_dict`` in ``dtype`` on ``device`` (strict: every weight must be
    there). Tensors are copied in one at a time, so a lazily read state dict never exists twice.

    ``streamed`` layers keep no weights: each forward of such a layer reads them from ``state_dict``
    and drops them after, so memory holds the resident part only (sampling from a model larger than
    the memory budget, at the price of re-reading those layers at every decoding step). A state dict that
    reads from disk (:class:`~kvforge.conversion.checkpoint.CheckpointWeights`) reads them into one
    reused buffer (:class:`LayerSlab`)."""
    with torch.device("meta"):
        model = CausalLM(config)
    model.to(dtype)
    parameters = model.state_dict()
    missing, unexpected = sorted(set(parameters) - set(state_dict)), sorted(set(state_dict) - set(parameters))
    if missing or unexpected:
        raise ValueError(f"build_model: missing tensors {missing[:6]}, unexpected tensors {unexpected[:6]}")
    layers = model.model.layers
    held = {index: layers[index] for index in sorted(set(streamed))}
    slab = LayerSlab() if held and hasattr(state_dict, "read") else None
    for index in held:
        layers[index] = nn.Identity()  # kept out of the allocation below
    model.to_empty(device=device)
    with torch.no_grad():
        for name, parameter in model.state_dict().items():
            parameter.copy_(state_dict[name])
    for index, layer in held.items():
        layers[index] = layer
        _stream_weights(layer, state_dict, layer_prefix(index), device, dtype, slab)
    model.model.rotary.apply(lambda m: m.reset_parameters() if isinstance(m, RotaryEmbedding) else None)
    return model.eval().requires_grad_(False)


class LayerSlab:
    """The bytes of one streamed layer, reused by every streamed layer in turn (each one's forward is
    over before the next one reads). A new buffer per tensor and step would cost a zeroed page fault per
    4 KiB under the pinned mmap threshold (:mod:`kvforge.conversion.host`): at 0.95B on 2 cores that was
    half of the sampling's time, most of it in the kernel."""

    ALIGN = 64  # bytes: every tensor's start, so a view of the slab can take any dtype

    def __init__(self) -> None:
        self.bytes = torch.empty(0, dtype=torch.uint8)

    def read(self, weights, names: list[str]) -> dict[str, torch.Tensor]:
        """``{name: weights[name]}``, each a view of the slab (``weights``: ``read(name, into=)`` and
        ``entries[name].nbytes``, as :class:`~kvforge.conversion.checkpoint.CheckpointWeights` has).
        The slab grows to the largest layer it is asked for; the views are valid until the next call."""
        starts, end = [], 0
        for name in names:
            starts.append(end)
            end += -(-weights.entries[name].nbytes // self.ALIGN) * self.ALIGN
        if self.bytes.numel() < end:
            self.bytes = torch.empty(end, dtype=torch.uint8)
        return {name: weights.read(name, into=self.bytes[start:]) for name, start in zip(names, starts)}


def _stream_weights(layer: nn.Module, state_dict, prefix: str, device, dtype, slab: LayerSlab | None) -> None:
    names = list(layer.state_dict())

    def load(module: nn.Module, args) -> None:
        source = state_dict if slab is None else slab.read(state_dict, [prefix + name for name in names])
        weights = {name: source[prefix + name].to(device, dtype) for name in names}
        module.load_state_dict(weights, strict=True, assign=True)

    def drop(module: nn.Module, args, output) -> None:
        module.to(device="meta")

    layer.register_forward_pre_hook(load)
    layer.register_forward_hook(drop)


def source_layer(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    index: int,
    device: torch.device | str = "cpu",
) -> DecoderLayer:
    """Layer ``index`` of the source in fp32 on ``device``: only its own tensors are read."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index)
    prefix = layer_prefix(index)
    # copy=True: the layer never aliases the caller's tensors, which fitting may not modify
    weights = {
        name: state_dict[prefix + name].to(device, torch.float32, copy=True) for name in layer.state_dict()
    }
    layer.load_state_dict(weights, strict=True, assign=True)
    return layer.eval().requires_grad_(False)


def rope_tables(config: ModelConfig, seq_len: int) -> dict[str, Rope]:
    """cos/sin of positions ``0..seq_len-1`` for each attention form of ``config`` (fp32)."""
    positions = torch.arange(seq_len)
    return {form: rotary(positions, torch.float32) for form, rotary in rotary_embeddings(config).items()}


class LayerStream:
    """The residual stream of calibration sequences before layer ``next_layer``, in chunks."""

    def __init__(
        self, config: ModelConfig, embeddings: torch.Tensor, ids: torch.Tensor, chunk_size: int = 8
    ) -> None:
        """``embeddings``: the source's ``embed_tokens`` weight (any dtype; the stream is fp32 on its device)."""
        self.config = config
        ids = ids.to(embeddings.device)
        self.hidden = [F.embedding(chunk, embeddings).float() for chunk in ids.split(chunk_size)]
        if config.embed_scale:  # as the decoder scales them (Gemma)
            scale = embedding_multiplier(config.d_model, embeddings.dtype)
            self.hidden = [h * scale for h in self.hidden]
        self.next_layer = 0
        self.views: dict[int, list[KVView]] = {}
        self.seq_len = ids.shape[1]

    def copy(self) -> LayerStream:
        twin = object.__new__(LayerStream)
        twin.__dict__.update(self.__dict__)
        twin.hidden = list(self.hidden)
        twin.views = dict(self.views)
        return twin

    @torch.no_grad()
    def attention_inputs(self, layer: DecoderLayer) -> list[torch.Tensor]:
        """What ``layer``'s attention reads: its input RMSNorm applied to the stream."""
        return [layer.input_layernorm(h) for h in self.hidden]

    @torch.no_grad()
    def advance(
        self, layer: DecoderLayer, rope: Rope, reads: int | None = None, keep_view: bool = False
    ) -> None:
        """Run ``layer`` (the source's or its replacement; ``reads``: the layer whose K/V it attends
        over) and move the stream past it."""
        shared = self.views[reads] if reads is not None else None
        outputs = [layer(h, rope, None, 0, shared[i] if shared else None) for i, h in enumerate(self.hidden)]
        self.hidden = [h for h, _ in outputs]
        if keep_view:
            self.views[self.next_layer] = [view for _, view in outputs]
        self.next_layer += 1


def load_calibration_ids(
    path: str | Path, tokenizer_dir: str | Path, n_tokens: int = 16384, seq_len: int = 512
) -> torch.Tensor:
    """Tokenize the start of a text file (no special tokens) into ``(n_tokens // seq_len, seq_len)`` ids."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration text {path} not found")
    if seq_len <= 0 or n_tokens < seq_len:
        raise ValueError(f"calibration: n_tokens={n_tokens} must be at least seq_len={seq_len} > 0")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    text = path.read_text(encoding="utf-8-sig")
    # Tokenize a prefix only: ~8 characters per token is generous for any English BPE/unigram vocab.
    ids = tokenizer(text[: 8 * n_tokens + 1024], add_special_tokens=False, verbose=False)["input_ids"]
    rows = min(len(ids), n_tokens) // seq_len
    if rows == 0:
        raise ValueError(f"calibration text {path} has {len(ids)} tokens, fewer than seq_len={seq_len}")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


@torch.no_grad()
def sample_calibration_ids(
    config: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    n_tokens: int = 16384,
    seq_len: int = 512,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    streamed: Iterable[int] = (),
    max_cache_bytes: int = SAMPLING_CACHE_BYTES,
) -> torch.Tensor:
    """Calibration text written by the source model itself: ``n_tokens // seq_len`` sequences sampled
    at temperature 1 (the start token dropped). No corpus is read, so it cannot overlap an evaluation
    text. Sequences start from BOS; a model without one starts where packed pretraining starts a
    document, after EOS; with neither, from a random token. The model runs in ``dtype`` on ``device``
    (the stored dtype keeps host memory at the checkpoint's size); ``streamed`` layers are read at
    every step instead of held (:func:`build_model`). Rows are sampled in batches whose KV cache fits
    ``max_cache_bytes``; all rows at once when they fit (the result depends on the batching)."""
    if not 0 < seq_len < config.max_seq_len or n_tokens < seq_len:
        raise ValueError(
            f"self-generated calibration: seq_len={seq_len} must be in 1..max_seq_len-1={config.max_seq_len - 1} "
            f"(the start token comes first) and n_tokens={n_tokens} at least seq_len"
        )
    model = build_model(config, state_dict, dtype=dtype, device=device, streamed=streamed)
    rows = n_tokens // seq_len
    generator = torch.Generator(device=device).manual_seed(seed)
    first = config.bos_token_id if config.bos_token_id is not None else config.eos_token_id
    if first is not None:
        start = torch.full((rows, 1), first, dtype=torch.long, device=device)
    else:
        start = torch.randint(config.vocab_size, (rows, 1), generator=generator, device=device)
    per_row = kv_cache_bytes(config, seq_len + 1, dtype)
    batch = max(1, min(rows, max_cache_bytes // per_row))
    ids = [
        generate(model, part, seq_len, temperature=1.0, generator=generator) for part in start.split(batch)
    ]
    return torch.cat(ids)[:, 1:].cpu()
