"""Convert a model directory into another one layer at a time: the one entry point of the CLI and training.

``convert_checkpoint(src, out, "gqa", {"n_kv_heads": 8})`` validates the options against SRC's
config and the config against SRC's safetensors headers (nothing large is allocated before), reads
one layer's tensors at a time (:class:`~kvforge.conversion.checkpoint.CheckpointWeights`), runs the
transform's math in fp32 on ``device`` (default: CUDA when available), carries the calibration
hidden states from layer to layer, and writes each converted layer as its own safetensors part
into a temporary sibling of OUT; the parts are then packed by size as ``kvforge export`` writes
(one ``model.safetensors`` up to 5GB, else 5GB shards) and the sibling renamed into place at the end
(a failure leaves nothing).
The whole model never exists in fp32; host memory is about one layer plus the embeddings, except
while ``calibration="self"`` samples text, which runs the model in its stored dtype.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvforge.arch import ModelConfig, parse_dtype

from . import transforms
from .atomic import atomic_directory
from .checkpoint import CheckpointWeights, check_tensors, checkpoint_entries
from .families import plan_export
from .host import one_cpu_thread, pin_mmap_threshold
from .loading import resolve_device
from .pretrained import EMBEDDINGS, LM_HEAD, export_config, load_config, write_directory_files
from .streamed_write import repack
from .transforms import TRANSFORMS
from .transforms.record import Transform
from .transforms.targets import COPY_THROUGH, is_noop

log = logging.getLogger(__name__)
CALIBRATION_SEQ_LEN = 512
STREAM_ABOVE_BYTES = 2**30
RUNTIME_OPTIONS = ("device", "progress")  # what the converter adds; a transform may not take them


class ShardWriter:
    """A :class:`~kvforge.conversion.transforms.common.Sink` writing each part it receives as one
    safetensors shard under ``directory`` (in the export family's layout and ``dtype``)."""

    def __init__(self, directory: Path, family: str | None, dtype: torch.dtype | None) -> None:
        self.directory, self.family_name, self.dtype = directory, family, dtype
        self.plan = self.config = None
        self.parts: list[tuple[Path, list[str]]] = []
        self.shapes: dict[str, torch.Tensor] = {}
        self.stored: torch.dtype | None = None

    def write(self, tensors: dict[str, torch.Tensor], config: ModelConfig) -> None:
        if self.plan is None:
            self.config, self.plan = config, plan_export(config, self.family_name)
        tensors = {
            name: t.to(self.dtype) if self.dtype and t.is_floating_point() else t
            for name, t in tensors.items()
        }
        self.shapes.update(
            {name: torch.empty(t.shape, dtype=t.dtype, device="meta") for name, t in tensors.items()}
        )
        if config.tie_embeddings:
            tensors.pop(LM_HEAD, None)  # transformers re-ties it on load
        self.plan.family.to_hf(tensors, config, {})
        if not tensors:
            return
        self.stored = self.stored or next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
        path = self.directory / f"part-{len(self.parts):05d}.safetensors"
        save_file(
            {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}, path, {"format": "pt"}
        )
        self.parts.append((path, list(tensors)))

    def finish(self, config: ModelConfig, tokenizer_from: Path) -> None:
        """Check the written shapes against ``config``, pack the parts into ``model.safetensors`` or
        shards of at most 5GB (:func:`~.streamed_write.repack`, export's rule), and write the index,
        config.json, tokenizer and generation config."""
        if self.config is None:
            raise ValueError("the transform wrote no tensors")
        if self.config.tie_embeddings and EMBEDDINGS in self.shapes:
            self.shapes.setdefault(LM_HEAD, self.shapes[EMBEDDINGS])
        check_tensors(config, self.shapes, "converted model")
        hf = export_config(self.plan.family, config, self.stored)
        # one layer per part while converting; the directory gets export's one rule (by size)
        repack(self.parts, self.directory)
        write_directory_files(self.directory, self.plan.family, hf, tokenizer_from)


@dataclass
class ConversionStart:
    """What :func:`convert_checkpoint` is about to do, once every check on SRC has passed."""

    config: ModelConfig  # the source's
    device: torch.device
    noop: bool  # the transform would leave the config as it is: the weights are copied through
    calibrates: bool  # calibration text is read or sampled next


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    transform: str,
    options: dict | None = None,
    *,
    device: str | torch.device | None = None,
    calibration: str | Path | torch.Tensor | None = "self",
    calib_tokens: int = 16384,
    calib_seq_len: int | None = None,
    seed: int = 0,
    family: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = False,
    on_ready: Callable[[ConversionStart], None] | None = None,
) -> tuple[Path, ModelConfig, ModelConfig]:
    """Convert the model directory ``src`` with ``TRANSFORMS[transform](**options)`` and export it to ``out``.
    ``options`` are the transform's (checked by its options dataclass; ``device`` and ``progress`` may be
    given there too).

    ``calibration``: ``"self"`` (default: text sampled from ``src`` itself, ``calib_tokens`` tokens in
    sequences of ``calib_seq_len``, seed ``seed``), a text file (not your evaluation text), a
    ``(batch, seq)`` tensor of token ids, or None (from the weights alone). ``family``: export family
    (None: the simplest stock class that holds the result, else kvforge-typed). ``dtype``: stored dtype
    of the output (default: the source's). ``on_ready`` is called once SRC's config, the options and the
    weight headers are all validated, before any calibration or writing (a command prints its start-up
    lines there; raising stops the conversion). A no-op (the target config is SRC's, e.g. ``mqa`` on
    an MQA model) samples nothing and copies the weights through. Returns ``(out, source config,
    converted config)``."""

    # process-wide: every freed layer-sized tensor leaves the process (.host); a training run's own
    # host_allocator setting, made before, stands
    pin_mmap_threshold(unless_settled=True)
    src, out = Path(src), Path(out)
    if out.exists() and not overwrite:  # before any reading
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    options = dict(options or {})
    runtime = {"device": device, "progress": progress}
    runtime.update({name: options.pop(name) for name in RUNTIME_OPTIONS if name in options})
    record = TRANSFORMS.get(transform)
    entries = checkpoint_entries(src)  # headers only, each checked against its file
    config, source_family, hf = load_config(src, entries)  # sizes checked against the headers
    noop = is_noop(transform, config, **options)  # the options checked against the config first
    options = record.parse(options)  # the typed options dataclass
    weights = CheckpointWeights(src, config, source_family, hf, entries)  # every shape checked
    device = runtime["device"] = resolve_device(runtime["device"])
    calibrates = calibration is not None and not noop and record.uses_calibration(options)
    if on_ready is not None:
        on_ready(ConversionStart(config, device, noop, calibrates))
    ids = None
    if calibrates:
        sampled = isinstance(calibration, str) and calibration == "self"
        seq_len = calib_seq_len or min(CALIBRATION_SEQ_LEN, config.max_seq_len - sampled)  # BOS comes first
        if isinstance(calibration, torch.Tensor):
            ids = calibration
        elif sampled:
            log.info(
                "sampling %d calibration tokens from %s (seed %d) on %s", calib_tokens, src, seed, device
            )
            # A decoding step is ~100 small matmuls on a few rows: on shared cores a second thread
            # mostly spins (docs/results.md, "One CPU thread for small fits and for sampling").
            with one_cpu_thread(device.type == "cpu"):
                ids = transforms.sample_calibration_ids(
                    config,
                    weights,
                    calib_tokens,
                    seq_len,
                    seed,
                    device=device,
                    dtype=weights.dtype,
                    streamed=_streamed_while_sampling(config, weights, device),
                )
        else:
            ids = transforms.load_calibration_ids(calibration, src, calib_tokens, seq_len)
    stored = parse_dtype(dtype) if dtype is not None else None
    with atomic_directory(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, family, stored)
        if noop:  # every tensor passes through unchanged
            record, options = COPY_THROUGH, COPY_THROUGH.options()
        new_config = _run_transform(record, config, weights, ids, options, runtime, writer)
        writer.finish(new_config, src)
    return out, config, new_config


def convert_chain(
    src: str | Path,
    out: str | Path,
    steps: list[tuple[str, dict]],
    *,
    family: str | None = None,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    **options,
) -> tuple[Path, ModelConfig, ModelConfig]:
    """:func:`convert_checkpoint` through several ``(transform, options)`` steps in turn, each one streamed
    from the directory the step before wrote. Those intermediate directories (kvforge-typed, in the
    source's dtype) live in a temporary directory beside ``out``, each removed once the next step has
    read it, all of them on failure; ``out`` is written atomically by the last step, with ``family``
    and ``dtype``. ``options`` (device, calibration, ...) go to every step. Returns
    ``(out, source config, converted config)``."""
    src, out = Path(src), Path(out)
    if not steps:
        raise ValueError("convert_chain: steps is empty; give at least one (transform, options) pair")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if len(steps) == 1:
        name, step_options = steps[0]
        return convert_checkpoint(
            src, out, name, step_options, family=family, dtype=dtype, overwrite=overwrite, **options
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.chain-", dir=out.parent) as work:
        current, source_config = src, None
        for number, (name, step_options) in enumerate(steps):
            last = number == len(steps) - 1
            target = out if last else Path(work) / f"step-{number}"
            written, config, new_config = convert_checkpoint(
                current,
                target,
                name,
                step_options,
                family=family if last else "kvforge",
                dtype=dtype if last else None,
                overwrite=overwrite and last,
                **options,
            )
            if current != src:
                shutil.rmtree(current)  # read to the end: only the newest intermediate is kept
            current, source_config = written, source_config or config
    return out, source_config, new_config


def _streamed_while_sampling(config: ModelConfig, weights: CheckpointWeights, device: torch.device) -> range:
    """Sampling runs the whole model at every step. On the host, a checkpoint over 1 GiB keeps its
    first half of layers resident and re-reads the second half at each step, so host memory stays
    near half the checkpoint (the budget) instead of all of it; a GPU holds every layer."""
    if device.type != "cpu" or weights.nbytes <= STREAM_ABOVE_BYTES:
        return range(0)
    return range(config.n_layers // 2, config.n_layers)


def _run_transform(
    record: Transform, config, weights, ids, options, runtime: dict, writer: ShardWriter
) -> ModelConfig:
    """Call a transform with its options and the runtime keywords (device, progress) its function
    declares. One that streams (every built-in transform) gets a ``sink`` and writes layer by layer; one
    that does not (a transform registered from outside) gets the whole state dict in memory and is
    written at the end - the streaming bound does not hold for it."""
    accepted = inspect.signature(record.function).parameters
    kwargs = {
        **{name: value for name, value in runtime.items() if name in accepted},
        **record.kwargs(options),
    }
    if record.streams:
        return record.function(config, weights, ids, **kwargs, sink=writer)[0]
    new_config, state_dict = record.function(config, dict(weights), ids, **kwargs)
    writer.write(state_dict, new_config)
    return new_config
