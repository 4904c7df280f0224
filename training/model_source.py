"""Where a run's weights start: a fresh ``ModelConfig``, or a checkpoint directory optionally passed
through a conversion transform (uptraining), plus the frozen teacher for distillation.

``convert`` names a transform of ``kvforge.conversion.transforms.TRANSFORMS`` under ``to``; every other
key is one of that transform's options, typed and checked by its options dataclass (the one
``kvforge convert``'s flags come from), so transforms added to the registry plug in without changes
here: ``{to: gqa, n_kv_heads: 2}``, ``{to: mla, kv_lora_rank: 32, ...}``. A list of them applies them
in order: ``[{to: gqa, n_kv_heads: 4}, {to: cla, factor: 2}]``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kvforge.arch import ModelConfig
from kvforge.conversion import Pretrained, load_config, load_pretrained
from kvforge.conversion.convert import convert_chain
from kvforge.conversion.loading import load_tokenizer, open_checkpoint
from kvforge.conversion.transforms import transform

from .data.documents import iter_pieces, resolve_files

StateDict = dict[str, torch.Tensor]


@dataclass
class CalibrationConfig:
    """Text a transform may run the source model on to choose its new weights. It must not be the
    evaluation text. The first ``n_sequences · seq_len`` tokens of ``files`` (tokenized with the
    source model's tokenizer, one stream) are cut into ``n_sequences`` rows."""

    files: list[str]
    n_sequences: int = 32
    seq_len: int = 256


@dataclass
class StartingPoint:
    """What :class:`KVForgeLM` builds its model(s) from: weights in memory, or a directory to read them from
    (a multi-process run reads them where they are needed, on the ranks that need them)."""

    config: ModelConfig
    state_dict: StateDict | None = None  # None and no weights_dir = random init
    teacher: Pretrained | None = None
    changed: frozenset[str] = frozenset()  # parameters the transform created or changed
    tokenizer_dir: str | None = None
    weights_dir: str | Path | None = None
    teacher_dir: str | Path | None = None
    teacher_config: ModelConfig | None = None

    def __post_init__(self) -> None:
        if self.teacher is not None and self.teacher_config is None:
            self.teacher_config = self.teacher.config

    @property
    def has_weights(self) -> bool:
        return self.state_dict is not None or self.weights_dir is not None

    def weights(self, rank_zero_only: bool = False, lazy: bool = False) -> Mapping[str, torch.Tensor] | None:
        """The student's full state dict (read from ``weights_dir`` if not in memory); ``None`` on ranks other
        than global rank 0 when ``rank_zero_only``. ``lazy``: a directory's weights stay on disk, each tensor
        read when asked for (``open_checkpoint``: what FSDP2's rank 0 broadcasts, one tensor at a time)."""
        if self.state_dict is not None or (rank_zero_only and not _global_rank_zero()):
            return self.state_dict
        return _read(self.weights_dir, lazy)

    def teacher_weights(
        self, rank_zero_only: bool = False, lazy: bool = False
    ) -> Mapping[str, torch.Tensor] | None:
        if self.teacher is not None:
            return self.teacher.state_dict
        if rank_zero_only and not _global_rank_zero():
            return None
        return _read(self.teacher_dir, lazy)


def _read(directory: str | Path, lazy: bool) -> Mapping[str, torch.Tensor]:
    if lazy:
        return open_checkpoint(directory)
    return load_pretrained(directory).state_dict


def _global_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


Convert = dict[str, Any] | list[dict[str, Any]]


def resolve_starting_point(
    model: ModelConfig | None,
    init_from: str | None,
    convert: Convert | None,
    calibration: CalibrationConfig | None,
    teacher_dir: str | None,
    want_teacher: bool,
    work_dir: str | Path | None = None,
) -> StartingPoint:
    """In one process: the model config, or ``init_from``'s weights (converted through ``convert`` when given,
    streamed, with a temporary directory under ``work_dir``: :func:`convert_in_work_dir`), and the teacher."""
    if (model is None) == (init_from is None):
        raise ValueError(
            "give exactly one of model (a ModelConfig: train from scratch) and init_from (a model directory: "
            f"uptrain); got model={'set' if model is not None else None}, init_from={init_from!r}"
        )
    if model is not None:
        if convert:
            raise ValueError("model.convert needs model.init_from: a transform converts existing weights")
        if want_teacher and teacher_dir is None:
            raise ValueError("distillation from scratch needs distill.teacher (a model directory)")
        teacher = load_pretrained(teacher_dir) if want_teacher else None
        return StartingPoint(model, teacher=teacher)
    if not Path(init_from).is_dir():
        raise FileNotFoundError(f"model.init_from={init_from!r} is not a directory")
    if convert:
        source, (student, changed) = None, convert_in_work_dir(init_from, convert, calibration, work_dir)
    else:
        source = student = load_pretrained(init_from)
        changed = frozenset()
    teacher = None
    if want_teacher:
        teacher = load_pretrained(teacher_dir) if teacher_dir else source or load_pretrained(init_from)
        check_teacher_vocabulary(teacher.config, student.config)
    return StartingPoint(student.config, student.state_dict, teacher, changed, init_from)


def convert_in_work_dir(
    init_from: str, convert: Convert, calibration: CalibrationConfig | None, work_dir: str | Path | None
) -> tuple[Pretrained, frozenset[str]]:
    """A one-process run's conversion: streamed into a temporary directory under ``work_dir`` (the run
    directory; None: the system's temporary directory), read back into memory, removed."""
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kvforge-convert-", dir=work_dir) as tmp:
        changed = convert_to_directory(init_from, convert, calibration, Path(tmp) / "converted")
        return load_pretrained(Path(tmp) / "converted"), changed


def convert_to_directory(
    init_from: str | Path, convert: Convert, calibration: CalibrationConfig | None, out: Path
) -> frozenset[str]:
    """Convert ``init_from`` into ``out`` (atomically); the names of the parameters it changed.

    Every step streams through ``convert_checkpoint`` (a layer in memory at a time, the math on CUDA when
    there is one); a chain of steps goes through one intermediate directory per step, beside ``out``
    (``convert_chain``). The changed names are found by reading the two directories tensor by tensor."""
    tokens = calibration_tokens(calibration, str(init_from)) if calibration else None
    steps = []
    for step in [convert] if isinstance(convert, dict) else list(convert):
        record, options = transform_and_options(step)
        steps.append((record.name, record.kwargs(options)))
    convert_chain(init_from, out, steps, calibration=tokens, overwrite=True)
    source, converted = open_checkpoint(init_from), open_checkpoint(out)
    return changed_parameters(source.config, source, converted.config, converted)


def locate_starting_point(
    model: ModelConfig | None,
    weights_dir: str | Path | None,
    teacher_dir: str | None,
    want_teacher: bool,
    changed: frozenset[str],
    tokenizer_dir: str | None,
) -> StartingPoint:
    """Like :func:`resolve_starting_point` but reading only configs: the weights stay on disk until the ranks
    that need them read them (``StartingPoint.weights``)."""
    config = model if model is not None else load_config(weights_dir)[0]
    if want_teacher and teacher_dir is None:
        raise ValueError("distillation from scratch needs distill.teacher (a model directory)")
    teacher_config = load_config(teacher_dir)[0] if want_teacher else None
    if teacher_config is not None:
        check_teacher_vocabulary(teacher_config, config)
    return StartingPoint(
        config,
        changed=changed,
        tokenizer_dir=tokenizer_dir,
        weights_dir=weights_dir,
        teacher_dir=teacher_dir if want_teacher else None,
        teacher_config=teacher_config,
    )


def check_teacher_vocabulary(teacher: ModelConfig, student: ModelConfig) -> None:
    if teacher.vocab_size != student.vocab_size:
        raise ValueError(
            f"distill.teacher has vocab_size={teacher.vocab_size} but the student has "
            f"{student.vocab_size}: the KL compares next-token distributions over one vocabulary"
        )


def check_convert(convert: Convert) -> None:
    """Refuse an unknown transform or option before anything is read (a multi-process run converts later,
    on rank 0)."""
    for step in [convert] if isinstance(convert, dict) else convert:
        transform_and_options(step)


def transform_and_options(convert: dict[str, Any]) -> tuple[Any, Any]:
    """The transform record of one ``model.convert`` step and its typed options dataclass (with
    :data:`TRANSFORMS`'s defaults: the same as ``kvforge convert``'s)."""
    options = dict(convert)
    record = transform(options.pop("to", None), "model.convert.to")
    return record, record.parse(options, "model.convert")


def changed_parameters(
    source_config: ModelConfig, source: StateDict, converted_config: ModelConfig, converted: StateDict
) -> frozenset[str]:
    """Parameters the transform created or changed (new name, new shape or new values); for a layer whose
    form changed but none of whose weights did (a CLA layer that now reads shared K/V), its attention
    parameters."""
    changed = {
        name
        for name, tensor in converted.items()
        if name not in source or source[name].shape != tensor.shape or not torch.equal(source[name], tensor)
    }
    for index, (before, after) in enumerate(zip(source_config.layers, converted_config.layers)):
        prefix = f"model.layers.{index}.self_attn."
        if dataclasses.asdict(before) != dataclasses.asdict(after) and not any(
            n.startswith(prefix) for n in changed
        ):
            changed |= {name for name in converted if name.startswith(prefix)}
    return frozenset(changed)


def calibration_tokens(calibration: CalibrationConfig, tokenizer_dir: str) -> torch.Tensor:
    tokenizer = load_tokenizer(tokenizer_dir)
    wanted = calibration.n_sequences * calibration.seq_len
    ids: list[int] = []
    for piece in iter_pieces(resolve_files(calibration.files, "calibration.files")):
        ids.extend(tokenizer(piece.text, add_special_tokens=False)["input_ids"])
        if len(ids) >= wanted:
            break
    if len(ids) < wanted:
        raise ValueError(
            f"model.calibration: {calibration.files} hold {len(ids)} tokens, fewer than n_sequences · seq_len = "
            f"{wanted}; lower them or add text"
        )
    return torch.tensor(ids[:wanted]).view(calibration.n_sequences, calibration.seq_len)
