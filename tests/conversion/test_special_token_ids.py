"""Every special-token id of the source's config.json survives import, conversion and export (not only
bos/eos/pad): a Gemma checkpoint's unk_token_id, a BERT-style sep/mask id."""

from __future__ import annotations

import json
import shutil

import pytest

from kvforge.cli.main import main
from kvforge.conversion import load_pretrained
from tests.conftest import shared_path

EXTRA_IDS = {"unk_token_id": 3, "sep_token_id": 4, "mask_token_id": None, "eot_token_id": [5, 6]}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    path = tmp_path_factory.mktemp("special") / "src"
    shutil.copytree(shared_path("stories260K"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **EXTRA_IDS}))
    return path


def test_import_keeps_every_other_token_id(source):
    config = load_pretrained(source).config
    assert config.special_token_ids == EXTRA_IDS
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, None)


@pytest.mark.parametrize(
    "command",
    [
        ["export"],
        ["export", "--family", "qwen2"],
        ["export", "--family", "kvforge"],
        ["convert", "--to", "mqa", "--method", "mean"],
    ],
    ids=["export", "export-qwen2", "export-kvforge", "convert"],
)
def test_export_and_convert_write_every_token_id_they_read(source, tmp_path, command):
    out = tmp_path / "out"
    assert main([command[0], str(source), str(out), *command[1:]]) == 0
    written = json.loads((out / "config.json").read_text())
    assert {key: written.get(key, "absent") for key in EXTRA_IDS} == EXTRA_IDS
    assert (written["bos_token_id"], written["eos_token_id"]) == (1, 2)
