"""Short causal depthwise convolution (Mamba's, Gated DeltaNet's and Qwen3-Next's ``conv1d`` on q/k/v):
each channel mixes its last ``K`` inputs. Decoding keeps the last ``K - 1`` inputs as the state, so a
block continues exactly where the previous one stopped."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_conv1d(
    x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None, activation: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` ``(batch, seq, channels)``, ``weight`` ``(channels, 1, K)`` (``nn.Conv1d``'s depthwise layout),
    ``state`` ``(batch, K - 1, channels)``: the inputs before ``x`` (zeros at the start of a sequence).
    Returns ``silu(conv)`` (or the plain convolution) ``(batch, seq, channels)`` and the new state."""
    batch, _, channels = x.shape
    width = weight.shape[-1]
    if weight.shape != (channels, 1, width):
        raise ValueError(f"causal_conv1d: weight {tuple(weight.shape)} must be (channels={channels}, 1, K)")
    if state is None:
        state = x.new_zeros(batch, width - 1, channels)
    if state.shape != (batch, width - 1, channels):
        raise ValueError(f"causal_conv1d: state {tuple(state.shape)} must be {(batch, width - 1, channels)}")
    padded = torch.cat((state.to(x.dtype), x), dim=1)
    y = F.conv1d(padded.transpose(1, 2), weight.to(x.dtype), groups=channels).transpose(1, 2)
    return (F.silu(y) if activation else y), padded[:, padded.shape[1] - (width - 1) :]
