"""Small pieces the training tests share: a tiny corpus, tiny models, and a loss-recording callback."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from kvforge.arch import ModelConfig
from kvforge.arch.presets import with_form
from kvforge.training.data import TextDataModule
from kvforge.training.module import KVForgeLM
from kvforge.training.optim import OptimizerConfig
from tests.conftest import shared_path

VOCAB = 320  # a byte-level BPE needs > 256 entries
CHAT_TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]: {% endif %}"
)
CHAT = [
    {"role": "user", "content": "Who is Lily?"},
    {"role": "assistant", "content": "A girl."},
    {"role": "user", "content": "And Tom?"},
    {"role": "assistant", "content": "Her dog."},
]


def chat_tokenizer(directory: Path) -> str:
    """stories260K's tokenizer with ``CHAT_TEMPLATE`` written into its tokenizer_config.json."""
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (directory / name).write_bytes(shared_path("stories260K", name).read_bytes())
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": CHAT_TEMPLATE}))
    return str(directory)


def tiny_corpus(directory: Path, chars: int = 12_000) -> Path:
    """The first ``chars`` characters of tinyshakespeare, as a file of its own."""
    text = shared_path("corpora", "tinyshakespeare.txt").read_text(encoding="utf-8")[:chars]
    path = directory / f"shakespeare_{chars}.txt"
    path.write_text(text, encoding="utf-8")
    return path


def tiny_config(form: str = "gqa", **overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, init_std=0.05)
    fields.update(overrides)
    return with_form(ModelConfig(**fields), form, window=8, kv_lora_rank=16, rope_dims=4)


def tiny_module(
    form: str = "gqa", lr: float = 3e-3, steps: int = 20, model: ModelConfig | None = None, **options
) -> KVForgeLM:
    optim = OptimizerConfig(lr=lr, warmup_steps=2, total_steps=steps, weight_decay=0.0)
    return KVForgeLM(model=model or tiny_config(form), optim=optim, **options)


def tiny_data(corpus: Path, cache: Path, **options) -> TextDataModule:
    settings = dict(
        block_size=32, batch_size=4, val_fraction=0.1, bpe_training_chars=20_000, cache_dir=str(cache)
    )
    settings.update(options)
    return TextDataModule(train_files=[str(corpus)], **settings)


def trainer(root: Path, max_steps: int, callbacks=(), **options) -> pl.Trainer:
    settings = dict(
        default_root_dir=str(root),
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        deterministic=True,
    )
    settings.update(options)
    return pl.Trainer(callbacks=list(callbacks), **settings)


class LossRecorder(pl.Callback):
    """``losses[step]`` = training loss of the batch that produced optimizer step ``step`` (1-based)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def tiny_yaml(
    directory: Path, corpus: Path, cache: Path, form_pattern: str = "[{}]", max_steps: int = 6
) -> Path:
    """A train.py config for a tiny from-scratch run on ``corpus``."""
    path = directory / "tiny.yaml"
    path.write_text(
        f"""model:
  model: {{vocab_size: {VOCAB}, d_model: 32, n_layers: 2, n_heads: 4, n_kv_heads: 2, max_seq_len: 64,
          pattern: {form_pattern}}}
  optim: {{lr: 0.003, warmup_steps: 2}}
data:
  train_files: [{corpus}]
  block_size: 32
  batch_size: 4
  val_fraction: 0.1
  bpe_training_chars: 20000
  cache_dir: {cache}
trainer:
  max_steps: {max_steps}
  accelerator: cpu
  val_check_interval: 3
  limit_val_batches: 2
  log_every_n_steps: 1
  enable_progress_bar: false
  enable_model_summary: false
"""
    )
    return path


class RankRecorder(pl.Callback):
    """Writes ``<directory>/rank<r>.json``: this rank's loss, the loss averaged over ranks for every step,
    and a checksum of the full (unsharded) weights at the end. For the multi-process tests."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.local: list[float] = []
        self.mean: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"].detach()
        self.local.append(loss.item())
        self.mean.append(trainer.strategy.reduce(loss.clone(), reduce_op="mean").item())

    def on_train_end(self, trainer, pl_module) -> None:
        import json

        from kvforge.training.callbacks import full_state_dict

        state = full_state_dict(pl_module.model)
        checksum = sum(float(t.double().abs().sum()) for t in state.values())
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"local": self.local, "mean": self.mean, "checksum": checksum, "world": trainer.world_size}
        record["host_allocator"] = pl_module.host_allocator.state  # what this rank's process runs with
        teacher = pl_module.__dict__.get("teacher")
        if teacher is not None:
            params = list(teacher.parameters())
            record["teacher"] = {
                "dtypes": sorted({str(p.dtype) for p in params}),
                "numel": sum(p.numel() for p in params),
                "local_numel": sum(getattr(p, "_local_tensor", p).numel() for p in params),
                "requires_grad": any(p.requires_grad for p in params),
            }
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def expected_host_allocator() -> str:
    """What a training process started from this one reports by default (``HostAllocator.state``)."""
    import os

    from kvforge.conversion import host
    from kvforge.training.host_allocator import DEFAULT_HOST_ALLOCATOR

    if host.ENVIRONMENT in os.environ:
        return "environment"
    return DEFAULT_HOST_ALLOCATOR if host.on_glibc() else "default"


def cli_args(
    subcommand: str, config: Path, run_dir: Path, *overrides: str, logger: bool = False
) -> list[str]:
    """``train.py`` arguments for a run of ``config`` writing to ``run_dir`` (no logger unless asked)."""
    args = [subcommand, "--config", str(config), "--trainer.default_root_dir", str(run_dir)]
    if not logger:
        args += ["--trainer.logger", "false"]
    return [*args, *overrides]
