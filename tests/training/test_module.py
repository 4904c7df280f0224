"""KVForgeLM: pre-training every form, uptraining through a transform with distillation, the staged
freeze, the frozen teacher, packed-document ids, and errors before training starts."""

from __future__ import annotations

import functools

import pytest
import torch

from kvforge.arch import CausalLM
from kvforge.arch.evaluate import windowed_nll
from kvforge.arch.presets import PRESETS
from kvforge.conversion.transforms import TRANSFORMS
from kvforge.training.data import TextDataModule
from kvforge.training.distill import DistillationConfig
from kvforge.training.module import KVForgeLM
from kvforge.training.optim import OptimizerConfig
from tests.conftest import shared_path
from tests.training.helpers import LossRecorder, tiny_corpus, tiny_data, tiny_module, trainer

MLA_UPTRAIN = {"to": "mla", "kv_lora_rank": 24, "rope_dims": 4}


@pytest.fixture(scope="module")
def corpus_and_cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("module")
    return tiny_corpus(root, chars=6_000), root / "cache"


@pytest.fixture(scope="module")
def stories(tmp_path_factory):
    """150k characters of TinyStories and a data module over them (tail 20 % held out)."""
    root = tmp_path_factory.mktemp("stories")
    text = shared_path("corpora", "tinystories_val_prefix.txt").read_text(encoding="utf-8")[:150_000]
    (root / "stories.txt").write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("form", PRESETS)
def test_a_few_steps_of_pretraining_lower_the_validation_loss(form, corpus_and_cache, tmp_path):
    corpus, cache = corpus_and_cache
    module, data = tiny_module(form, steps=12), tiny_data(corpus, cache, val_fraction=0.2)
    run = trainer(tmp_path, 12, limit_val_batches=1.0)
    before = run.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    run.fit(module, datamodule=data)
    after = run.validate(module, datamodule=data, verbose=False)[0]["val/loss"]
    assert after < before - 0.3


def _stories_data(stories, **options) -> TextDataModule:
    return TextDataModule(
        sources=[{"files": [str(stories / "stories.txt")]}], cache_dir=str(stories / "cache"), **options
    )


def _uptrain(stories, tmp_path, convert, steps=30):
    source_dir = str(shared_path("stories260K-mha"))
    data = _stories_data(stories, block_size=128, batch_size=8, val_fraction=0.2)
    module = KVForgeLM(
        init_from=source_dir,
        convert=convert,
        distill=DistillationConfig(alpha=0.5),
        optim=OptimizerConfig(lr=3e-3, warmup_steps=3, weight_decay=0.0),
    )
    data.build(module.config, module.tokenizer_source)
    module.configure_model()
    source = KVForgeLM(init_from=source_dir)
    source.configure_model()
    held_out = data.val_tokens()[: 16 * 512 + 1]
    source_loss = windowed_nll(source.model, held_out).mean
    zero_shot = windowed_nll(module.model, held_out).mean
    trainer(tmp_path, steps).fit(module, datamodule=data)
    after = windowed_nll(module.model, held_out).mean
    return source_loss, zero_shot, after


@pytest.mark.slow
def test_uptraining_mha_to_gqa2_recovers_part_of_the_conversion_gap(stories, tmp_path):
    source_loss, zero_shot, after = _uptrain(stories, tmp_path, {"to": "gqa", "n_kv_heads": 2})
    assert zero_shot > source_loss + 1.0  # mean-pooling 8 → 2 heads costs a lot zero-shot
    assert (zero_shot - after) / (zero_shot - source_loss) > 0.25


@pytest.mark.slow
@pytest.mark.skipif(
    "mla" not in TRANSFORMS, reason="no `mla` transform in TRANSFORMS yet (conversion engineer)"
)
def test_uptraining_mha_to_mla_recovers_part_of_the_conversion_gap(stories, tmp_path):
    source_loss, zero_shot, after = _uptrain(stories, tmp_path, MLA_UPTRAIN)
    assert after < zero_shot
    if zero_shot - source_loss > 0.05:
        assert (zero_shot - after) / (zero_shot - source_loss) > 0.25


def test_converted_only_steps_update_only_the_converted_parameters_first(stories, tmp_path):
    module = KVForgeLM(
        init_from=str(shared_path("stories260K-mha")),
        # mean-pooling changes only k/v (the default 'aligned' merge also rescales q and refolds o_proj)
        convert={"to": "gqa", "n_kv_heads": 2, "method": "mean"},
        optim=OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=3),
        converted_only_steps=2,
    )
    assert module.changed_parameters == {
        f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(5) for p in ("k", "v")
    }
    data = _stories_data(stories, block_size=64, batch_size=2, val_fraction=0.0)
    snapshots = []

    class Snapshot(LossRecorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})

    trainer(tmp_path, 3, callbacks=[Snapshot()]).fit(module, datamodule=data)
    start = {n: t for n, t in module.model.named_parameters()}  # noqa: F841 (final values)
    q, k = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(snapshots[0][q], snapshots[1][q])  # frozen during the first two steps
    assert not torch.equal(snapshots[0][k], snapshots[1][k])
    assert not torch.equal(snapshots[1][q], snapshots[2][q])  # everything trains from step 3


def test_trainable_attention_updates_only_attention_parameters(stories, tmp_path):
    module = KVForgeLM(
        init_from=str(shared_path("stories260K-mha")),
        convert={"to": "gqa", "n_kv_heads": 2, "method": "mean"},
        distill=DistillationConfig(alpha=0.5),
        optim=OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=2),
        trainable="attention",
    )
    data = _stories_data(stories, block_size=64, batch_size=2, val_fraction=0.0)
    module.configure_model()
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    trainer(tmp_path, 2).fit(module, datamodule=data)
    moved = {n for n, p in module.model.named_parameters() if not torch.equal(p, before[n])}
    attention = {n for n in before if ".self_attn." in n}
    assert moved and moved <= attention  # embeddings, MLPs, norms and the head keep their weights
    assert "model.layers.0.self_attn.q_proj.weight" in moved  # unconverted attention weights train too
    assert all(p.requires_grad == (n in attention) for n, p in module.model.named_parameters())


def test_the_teacher_stays_frozen_and_out_of_the_checkpoint(stories, tmp_path):
    module = KVForgeLM(
        init_from=str(shared_path("stories260K-mha")),
        convert={"to": "gqa", "n_kv_heads": 2},
        distill=DistillationConfig(alpha=0.0),
        optim=OptimizerConfig(lr=1e-2, warmup_steps=0, total_steps=2),
    )
    data = _stories_data(stories, block_size=64, batch_size=2, val_fraction=0.0)
    run = trainer(tmp_path, 2)
    run.fit(module, datamodule=data)
    teacher = module.__dict__["teacher"]
    source = CausalLM(teacher.config)
    source.load_state_dict(
        dict(
            __import__("kvforge.conversion", fromlist=["load_pretrained"])
            .load_pretrained(shared_path("stories260K-mha"))
            .state_dict
        )
    )
    for (name, theirs), ours in zip(source.state_dict().items(), teacher.state_dict().values()):
        assert torch.equal(theirs, ours), name
    run.save_checkpoint(tmp_path / "c.ckpt")
    saved = torch.load(tmp_path / "c.ckpt", weights_only=True)["state_dict"]
    assert saved and all(name.startswith("model.") for name in saved)


def _documents_corpus(directory):
    text = shared_path("corpora", "tinyshakespeare.txt").read_text(encoding="utf-8")[:8_000]
    path = directory / "docs.txt"
    path.write_text(text.replace("\n\n", "<doc>"), encoding="utf-8")  # one document per speech
    return path


@pytest.mark.parametrize("masking", [True, False])
def test_document_ids_reach_the_loss_only_with_document_masking(
    masking, monkeypatch, corpus_and_cache, tmp_path
):
    seen = []
    original = CausalLM.loss

    @functools.wraps(original)
    def spy(self, *args, document_ids=None, **kwargs):
        seen.append(document_ids)
        return original(self, *args, document_ids=document_ids, **kwargs)

    monkeypatch.setattr(CausalLM, "loss", spy)
    data = tiny_data(
        _documents_corpus(tmp_path), corpus_and_cache[1], txt_separator="<doc>", document_masking=masking
    )
    trainer(tmp_path, 2).fit(tiny_module(steps=4), datamodule=data)
    if masking:
        assert all(ids is not None and ids.shape == (4, 32) for ids in seen)
        assert any(ids.max() > 0 for ids in seen)
    else:
        assert seen == [None, None]


def test_blocks_of_one_document_need_no_mask(corpus_and_cache, tmp_path):
    data = tiny_data(*corpus_and_cache)  # one .txt file = one document
    data.build(tiny_module().config, None)
    batch = next(iter(data.train_dataloader()))
    assert "document_ids" not in data.on_before_batch_transfer(batch, 0)


def test_loss_is_cross_entropy_without_a_teacher(corpus_and_cache, tmp_path):
    module, recorder = tiny_module(steps=4), LossRecorder()
    data = tiny_data(*corpus_and_cache)
    trainer(tmp_path, 1, callbacks=[recorder]).fit(module, datamodule=data)
    assert 4.0 < recorder.losses[1] < 7.0  # ≈ ln(320) = 5.77 at initialisation


def _final_weights(module):
    return torch.cat([p.detach().flatten() for p in module.model.parameters()])


def test_gradient_accumulation_matches_the_larger_batch(corpus_and_cache, tmp_path):
    corpus, cache = corpus_and_cache
    torch.manual_seed(0)
    whole = tiny_module(steps=2)
    trainer(tmp_path / "a", 2).fit(whole, datamodule=tiny_data(corpus, cache, batch_size=4))
    torch.manual_seed(0)
    accumulated = tiny_module(steps=2)
    run = trainer(tmp_path / "b", 2, accumulate_grad_batches=2)
    run.fit(accumulated, datamodule=tiny_data(corpus, cache, batch_size=2))
    torch.testing.assert_close(_final_weights(accumulated), _final_weights(whole), rtol=1e-5, atol=1e-5)


def test_activation_checkpointing_leaves_the_training_unchanged(corpus_and_cache, tmp_path):
    losses = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        recorder = LossRecorder()
        module = tiny_module("mix", steps=3, activation_checkpointing=checkpointing)
        trainer(tmp_path / str(checkpointing), 3, callbacks=[recorder]).fit(
            module, datamodule=tiny_data(*corpus_and_cache)
        )
        assert module.model.model.gradient_checkpointing is checkpointing
        losses.append(recorder.losses)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_mixed_compiled_training_lowers_the_loss_on_gpu(corpus_and_cache, tmp_path):
    recorder = LossRecorder()
    module = tiny_module(steps=20, compile=True)
    run = trainer(tmp_path, 20, callbacks=[recorder], accelerator="gpu", precision="bf16-mixed")
    run.fit(module, datamodule=tiny_data(*corpus_and_cache))
    assert recorder.losses[20] < recorder.losses[1] - 0.3
