"""One record per transform: `kvforge convert`'s flags, YAML `model.convert` and the docs table come from
it, so a transform defined here, in the test file, plus one registry line appears in all three
(docs/extending.md walks through the same steps)."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest

from kvforge.conversion.transforms import TRANSFORMS
from kvforge.conversion.transforms.record import Transform, option
from kvforge.conversion.transforms.table import BEGIN, END, markdown_table
from kvforge.training.cli import build_parser, main
from kvforge.training.model_source import transform_and_options
from tests.conftest import REPO, shared_path


def to_uniform_window(config, state_dict, calibration=None, *, span: int, note: str = "none"):
    """Every layer slides over ``span`` tokens; the weights do not change (a whole-state-dict transform)."""
    layers = [dataclasses.replace(spec, window=span) for spec in config.layers]
    return dataclasses.replace(config, layers=layers, pattern=None), dict(state_dict)


@dataclasses.dataclass(kw_only=True)
class UniformWindowOptions:
    span: int = option(help="tokens every layer attends over")
    note: str = option("none", help="a free-text option, to show strings")


def _check(config, options):
    if not 0 < options.span < config.max_seq_len:
        raise ValueError(f"to_uniform_window: span={options.span} must be in 1..{config.max_seq_len - 1}")


UNIFORM_WINDOW = Transform(
    "uniform_window",
    to_uniform_window,
    UniformWindowOptions,
    check=_check,
    summary="the same sliding window on every layer",
    streams=False,
)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(TRANSFORMS, UNIFORM_WINDOW.name, UNIFORM_WINDOW)  # the one registry line


def _convert_help() -> str:
    return build_parser()._subparsers._group_actions[0].choices["convert"].format_help()


def test_a_new_transform_appears_in_convert_help_yaml_and_the_docs_table(registered):
    help_text = " ".join(_convert_help().split())
    assert "uniform_window" in help_text and "--span SPAN tokens every layer attends over" in help_text
    record, options = transform_and_options({"to": "uniform_window", "span": 16})
    assert record is UNIFORM_WINDOW and options == UniformWindowOptions(span=16)
    with pytest.raises(ValueError, match=r"model\.convert: span='16' is not an integer"):
        transform_and_options({"to": "uniform_window", "span": "16"})
    assert "| `uniform_window` | the same sliding window on every layer |" in markdown_table()


def test_a_new_transform_converts_a_directory_from_the_command_line(registered, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["convert", str(shared_path("stories260K")), str(out), "--to", "uniform_window", "--span", "16"]
    assert main(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["sliding_window"] == 16
    assert main([*args[:2], str(tmp_path / "bad"), "--to", "uniform_window", "--span", "9999"]) == 2
    assert "span=9999 must be in 1.." in capsys.readouterr().err


def test_every_option_default_is_the_functions_default():
    for record in TRANSFORMS.values():
        parameters = inspect.signature(record.function).parameters
        for item in record.fields():
            if item.name in parameters:
                expected = parameters[item.name].default
                expected = dataclasses.MISSING if expected is inspect.Parameter.empty else expected
                assert item.default == expected, f"{record.name}.{item.name}"


def test_yaml_steps_are_typed_and_checked_by_the_options_dataclass():
    with pytest.raises(ValueError, match=r"model\.convert: n_kv_heads='2' is not an integer"):
        transform_and_options({"to": "gqa", "n_kv_heads": "2"})
    with pytest.raises(ValueError, match=r"method='best' is not one of \['aligned', 'mean'\]"):
        transform_and_options({"to": "gqa", "n_kv_heads": 2, "method": "best"})
    with pytest.raises(ValueError, match=r"needs option\(s\) \['windows'\]"):
        transform_and_options({"to": "window"})


def test_another_transforms_flag_is_refused(tmp_path, capsys):
    args = ["convert", str(shared_path("stories260K")), str(tmp_path / "out"), "--to", "gqa"]
    assert main([*args, "--n-kv-heads", "2", "--factor", "3"]) == 2
    assert "--to gqa takes no --factor" in capsys.readouterr().err


def test_the_docs_table_is_the_registry():
    text = (REPO / "docs" / "transforms.md").read_text(encoding="utf-8")
    table = text.partition(BEGIN)[2].partition(END)[0].strip()
    assert table == markdown_table(), "run: python -m kvforge.conversion.transforms.table docs/transforms.md"
