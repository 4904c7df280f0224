"""Full tensors between global rank 0 and the shards of an FSDP2 model, one tensor (or one layer) at a time.

Loading (:func:`broadcast_into_shards`): rank 0 reads each tensor from its source - a lazy mapping such as
:class:`~kvforge.conversion.checkpoint.CheckpointWeights`, which reads a tensor from the safetensors file
when asked - and broadcasts it; every rank copies its own slice into its shard and frees the rest. No
process ever holds more than one full tensor besides its shards (``set_model_state_dict(...,
broadcast_from_rank0=True)`` needs the whole state dict on rank 0). Works with gloo on the CPU and NCCL on
CUDA: the tensors travel on the device the shards live on.

Export (:class:`GatheredWeights`): a lazy mapping of the model's full tensors for rank 0's writer
(:func:`kvforge.conversion.save_pretrained`), which reads a decoder layer at a time; each read is an
all-gather the other ranks take part in through :meth:`GatheredWeights.serve`. Rank 0 drives: it
broadcasts the names of each group before gathering it and an end marker when it is done (or failed),
so the ranks cannot disagree on the order and a failed writer does not leave them waiting.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from kvforge.conversion.streamed_write import source_meta


def _targets(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's state tensors by name, each storage once, and the aliases (a tied LM head -> embeddings)."""
    targets, aliases, seen = {}, {}, {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            aliases[name] = seen[id(tensor)]
            continue
        seen[id(tensor)] = name
        targets[name] = tensor
    return targets, aliases


# A DTensor's shape is its global (full) shape: the shapes compared below are the full ones.
def _announce(source: Mapping | None, targets: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict:
    """Rank 0: the dtype of each tensor it will send, after checking names and shapes (headers only)."""
    if source is None:
        raise ValueError("load_full_state: global rank 0 needs the weights to broadcast")
    meta = source_meta(source)
    missing = sorted(set(targets) - set(meta))
    unexpected = sorted(set(meta) - set(targets) - set(aliases))
    wrong = [
        f"{name} {tuple(meta[name].shape)} (model has {tuple(t.shape)})"
        for name, t in targets.items()
        if name in meta and meta[name].shape != t.shape
    ]
    problems = [
        f"{label}: {', '.join(names[:6])}{f', … ({len(names)} in all)' if len(names) > 6 else ''}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shapes", wrong))
        if names
    ]
    if problems:
        raise ValueError("the weights do not fit the model - " + "; ".join(problems))
    return {name: meta[name].dtype for name in targets}


@torch.no_grad()
def broadcast_into_shards(model: torch.nn.Module, source: Mapping[str, torch.Tensor] | None) -> None:
    """Load full tensors from global rank 0's ``source`` (ignored on the other ranks, pass None) into the
    (FSDP2-sharded) ``model``, one tensor at a time: rank 0 reads it, broadcasts it in its stored dtype,
    and every rank copies its slice into its shard (casting to the shard's dtype). A source that does
    not fit the model, or a tensor rank 0 fails to read, is an error on every rank."""
    rank = dist.get_rank()
    targets, aliases = _targets(model)
    announced: list[object] = [None]
    if rank == 0:
        try:
            announced[0] = _announce(source, targets, aliases)
        except (ValueError, OSError) as err:
            announced[0] = f"{type(err).__name__}: {err}"
    dist.broadcast_object_list(announced, src=0)
    if isinstance(announced[0], str):
        raise ValueError(f"loading the weights from global rank 0 failed: {announced[0]}")
    dtypes = announced[0]
    for name, target in targets.items():
        device = target.device
        full, failure = None, None
        if rank == 0:
            try:
                full = source[name].to(device=device, dtype=dtypes[name])
                if full.shape != target.shape:
                    raise ValueError(f"{name}: read {tuple(full.shape)}, the model has {tuple(target.shape)}")
            except (ValueError, OSError) as err:
                failure = err
        ok = torch.tensor([failure is None], dtype=torch.int32, device=device)
        dist.broadcast(ok, src=0)
        if not bool(ok.item()):
            if failure is not None:
                raise failure
            raise ValueError(f"global rank 0 could not read {name!r} (its log says why)")
        if full is None:
            full = torch.empty(target.shape, dtype=dtypes[name], device=device)
        dist.broadcast(full, src=0)
        _copy_into(target, full)
        del full


def _copy_into(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` into ``target`` (a DTensor shard, or a replicated tensor)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(target, DTensor):  # as set_model_state_dict does it (no DTensor of the full tensor made)
        shape, offset = compute_local_shape_and_global_offset(
            full.shape, target.device_mesh, target.placements
        )
        part = full[tuple(slice(start, start + size) for size, start in zip(shape, offset))]
        target.to_local().copy_(part)
    else:
        target.copy_(full)


class GatheredWeights(Mapping):
    """The full tensors of an FSDP2 model, gathered when read (a collective: global rank 0 reads, the
    other ranks :meth:`serve`). ``meta()`` and ``keys`` need no communication. Reads return CPU tensors
    on rank 0."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.tensors = dict(model.state_dict(keep_vars=True))
        self.stopped = False

    def meta(self) -> dict[str, torch.Tensor]:
        return {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in self.tensors.items()}

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read_many([name])[name]

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Rank 0: announce ``names`` to the serving ranks, gather them together, keep them on the CPU."""
        if self.stopped:
            raise RuntimeError("GatheredWeights: read after finish()")
        unknown = sorted(set(names) - set(self.tensors))
        if unknown:
            raise KeyError(f"no such tensors in the model: {unknown}")
        dist.broadcast_object_list([list(names)], src=0)
        return {name: self._gather(name).cpu() for name in names}

    def finish(self) -> None:
        """Rank 0, when done or failed: release the serving ranks."""
        if not self.stopped:
            self.stopped = True
            dist.broadcast_object_list([None], src=0)

    def serve(self) -> None:
        """Other ranks: take part in rank 0's gathers until it finishes."""
        while True:
            message: list[object] = [None]
            dist.broadcast_object_list(message, src=0)
            if message[0] is None:
                return
            for name in message[0]:
                self._gather(name)

    def _gather(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name]
        return tensor.full_tensor().detach() if hasattr(tensor, "full_tensor") else tensor.detach()
