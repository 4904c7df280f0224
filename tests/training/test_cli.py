"""train.py (LightningCLI): shipped configs, overrides, strict keys, loggers, checkpoints and export."""

from __future__ import annotations

import csv
import os

import pytest
import torch
import transformers
import yaml

from kvforge.arch import CausalLM
from kvforge.cli.main import main
from kvforge.conversion import load_pretrained
from kvforge.conversion.transforms import TRANSFORMS
from kvforge.training.lightning_cli import KVForgeCLI
from tests.conftest import REPO
from tests.training.helpers import cli_args, tiny_corpus, tiny_yaml

CPU_CONFIGS = sorted(
    p.name for p in (REPO / "configs" / "pretrain").glob("*.yaml") if not p.name.startswith("gpu")
)
GPU_CONFIGS = sorted(p.name for p in (REPO / "configs" / "pretrain").glob("gpu*.yaml"))
# hybrid.yaml fits every converted layer by attention transfer when it is instantiated (about a minute).
UPTRAIN_CONFIGS = [
    pytest.param(name, marks=pytest.mark.slow) if name == "hybrid.yaml" else name
    for name in sorted(p.name for p in (REPO / "configs" / "uptrain").glob("*.yaml"))
]


@pytest.fixture(scope="module")
def corpus_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny_corpus(root, chars=6_000), root / "cache"


def _instantiate(*args):
    return KVForgeCLI(args=[*args, "--trainer.logger", "false"], run=False)


@pytest.mark.parametrize("name", CPU_CONFIGS)
def test_cpu_pretraining_config_instantiates(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cli = _instantiate("--config", f"configs/pretrain/{name}")
    assert cli.model.config.n_layers == 4
    assert cli.datamodule.block_size <= cli.model.config.max_seq_len


def test_every_attention_form_has_a_cpu_config():
    assert {n.removesuffix(".yaml") for n in CPU_CONFIGS} >= {"mha", "gqa", "mqa", "mla", "cla", "swa", "mix"}


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_gpu_pretraining_config_instantiates(name, monkeypatch, corpus_and_cache):
    monkeypatch.chdir(REPO)
    corpus, _ = corpus_and_cache
    cli = _instantiate("--config", f"configs/pretrain/{name}", "--data.sources", f"[{{files: [{corpus}]}}]")
    params = cli.model.architecture_summary()["parameters"]
    assert 100e6 <= params <= 1.5e9


@pytest.mark.parametrize("name", UPTRAIN_CONFIGS)
def test_uptraining_config_instantiates(name, monkeypatch):
    monkeypatch.chdir(REPO)
    convert = yaml.safe_load((REPO / "configs" / "uptrain" / name).read_text())["model"]["convert"]
    missing = [
        step["to"]
        for step in (convert if isinstance(convert, list) else [convert])
        if step["to"] not in TRANSFORMS
    ]
    if missing:
        pytest.skip(f"transform(s) {missing} not in TRANSFORMS yet")
    cli = _instantiate("--config", f"configs/uptrain/{name}")
    assert cli.model.changed_parameters
    assert cli.model.distill is not None


def test_command_line_overrides_a_nested_field(monkeypatch):
    monkeypatch.chdir(REPO)
    cli = _instantiate(
        "--config", "configs/pretrain/gqa.yaml", "--model.optim.lr", "0.01", "--model.model.n_kv_heads", "4"
    )
    assert cli.model.optim.lr == 0.01
    assert {spec.n_kv_heads for spec in cli.model.config.layers} == {4}


def test_unknown_config_key_is_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "configs/pretrain/gqa.yaml").read_text().replace("n_layers: 4", "n_layers: 4\n    n_layer: 4")
    )
    with pytest.raises(SystemExit) as exit_info:
        KVForgeCLI(args=["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "n_layer" in capsys.readouterr().err


def test_print_config_prints_the_resolved_configuration(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exit_info:
        KVForgeCLI(args=["fit", "--config", "configs/pretrain/mla.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["model"]["kv_lora_rank"] == 64
    assert printed["trainer"]["max_steps"] == 300


def test_csv_logger_writes_the_training_metrics(tmp_path, corpus_and_cache):
    config = tiny_yaml(tmp_path, *corpus_and_cache)
    csv_logger = ["--trainer.logger", "CSVLogger", "--trainer.logger.save_dir", str(tmp_path / "csv")]
    KVForgeCLI(
        args=cli_args(
            "fit", config, tmp_path / "run", "--throughput.window_size", "2", *csv_logger, logger=True
        )
    )
    (metrics_file,) = (tmp_path / "csv").rglob("metrics.csv")
    logged = {key for row in csv.DictReader(metrics_file.open()) for key, value in row.items() if value}
    expected = {"train/loss", "train/ppl", "train/lr", "train/grad_norm", "val/loss", "val/ppl"}
    assert expected | {"train/device/items_per_sec"} <= logged
    (hparams,) = (tmp_path / "csv").rglob("hparams.yaml")
    logged_hparams = yaml.safe_load(hparams.read_text())
    assert logged_hparams["kv_bytes_per_token"] > 0
    assert logged_hparams["config"]["data"]["block_size"] == 32


def test_wandb_runs_offline_without_an_api_key(tmp_path, corpus_and_cache, monkeypatch, caplog):
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a wandb login
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    config = tiny_yaml(tmp_path, *corpus_and_cache, max_steps=2)
    KVForgeCLI(args=cli_args("fit", config, tmp_path / "run", logger=True))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert "logging offline" in caplog.text


def test_fit_checkpoints_and_exports_a_model_transformers_loads(tmp_path, corpus_and_cache):
    run_dir = tmp_path / "run"
    KVForgeCLI(args=cli_args("fit", tiny_yaml(tmp_path, *corpus_and_cache), run_dir))
    exported = load_pretrained(run_dir / "hf")
    ours = CausalLM(exported.config)
    ours.load_state_dict(exported.state_dict)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run_dir / "hf")
    ids = torch.tensor([tokenizer("To be, or not to be")["input_ids"]])
    torch.testing.assert_close(theirs(ids).logits, ours.eval()(ids), rtol=1e-4, atol=1e-4)
    assert main(["export", str(run_dir / "checkpoints" / "last.ckpt"), str(tmp_path / "again")]) == 0
    again = tmp_path / "again"
    assert (again / "tokenizer.json").is_file()
    assert (again / "model.safetensors").read_bytes() == (run_dir / "hf" / "model.safetensors").read_bytes()


def test_resume_with_ckpt_path_last_continues_the_run(tmp_path, corpus_and_cache):
    args = cli_args("fit", tiny_yaml(tmp_path, *corpus_and_cache, max_steps=3), tmp_path / "run")
    KVForgeCLI(args=args)
    cli = KVForgeCLI(args=[*args, "--trainer.max_steps", "5", "--ckpt_path", "last"])
    assert cli.trainer.global_step == 5
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5


def test_validate_subcommand_reports_the_validation_loss(tmp_path, corpus_and_cache):
    cli = KVForgeCLI(args=cli_args("validate", tiny_yaml(tmp_path, *corpus_and_cache), tmp_path / "run"))
    assert cli.trainer.callback_metrics["val/loss"] > 0
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
