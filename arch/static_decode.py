"""Fixed-shape decoding: a static KV cache and a one-token step whose shapes, buffer addresses and
host-side arguments never change - so on CUDA the step is captured once in a CUDA graph and each
token is one ``graph.replay()`` (no per-token kernel launches from Python, no allocation, no host
sync). On CPU the very same step runs eagerly.

Why: a decode step reads the weights and the cache in about a millisecond on a GPU, while launching
its few hundred small kernels one by one from Python costs far more (figures: docs/results.md, "Static
decode: why a CUDA graph"). The prompt (prefill) has a varying length and is not captured: it runs
through the same cache with host positions.
"""

from __future__ import annotations

import torch

from .model import CausalLM

# Eager runs of the step before capture: lazy initialisation (cuBLAS handles, Triton/compile
# autotuning) must happen outside the graph.
WARMUP_STEPS = 2


class StaticDecoder:
    """Decode ``batch`` sequences of up to ``max_len`` tokens in lockstep with fixed shapes.

    ``prefill(ids)`` resets the cache and runs the prompt; each ``step(next_ids)`` appends one token
    per row and returns the next logits ``(batch, vocab)``. ``cuda_graph=None`` captures on CUDA
    only; ``compile=True`` also ``torch.compile``s the step (kernel fusion) before capture. The
    returned logits of a captured step live in the graph's output buffer: read or copy them before
    the next step.
    """

    def __init__(
        self,
        model: CausalLM,
        batch: int,
        max_len: int,
        *,
        dtype: torch.dtype | None = None,
        cuda_graph: bool | None = None,
        compile: bool = False,
    ) -> None:
        device = model.model.embed_tokens.weight.device
        if cuda_graph is None:
            cuda_graph = device.type == "cuda"
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, it is on {device.type!r}")
        self.model = model
        self.cache = model.new_cache(batch, max_len, dtype=dtype, static=True)
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cuda_graph = cuda_graph
        self._forward = torch.compile(self._eager_step) if compile else self._eager_step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]

    def _eager_step(self) -> torch.Tensor:
        return self.model(self.input_ids, cache=self.cache, logits_to_keep=1)[:, -1]

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Forget the previous sequences, run the prompt ``(batch, prompt)``; last logits ``(batch, vocab)``."""
        if input_ids.shape[0] != self.batch:
            raise ValueError(f"prefill: batch {input_ids.shape[0]} != the decoder's batch {self.batch}")
        self.cache.reset()
        return self.model(input_ids, cache=self.cache, logits_to_keep=1)[:, -1]

    @torch.no_grad()
    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append ``next_ids`` ``(batch,)`` and return the logits that follow them."""
        self.cache.check_room(1)
        self.input_ids.copy_(next_ids.view(self.batch, 1))
        if not self.cuda_graph:
            return self._forward()
        if self.graph is None:
            self._capture()
        self.graph.replay()
        self.cache.length += 1  # the replay advanced the device position; keep the host count with it
        return self.logits

    def _capture(self) -> None:
        length, position = self.cache.length, self.cache.position.clone()

        def rewind() -> None:  # warm-up and capture must not count as decoded tokens
            self.cache.length = length
            self.cache.position.copy_(position)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):  # writes this step's own K/V slot, which the replay rewrites
                self._forward()
                rewind()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        rewind()
