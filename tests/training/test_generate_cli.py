"""``kvforge generate`` on the real stories260K checkpoint reproduces the reference greedy decode."""

from __future__ import annotations

import json

import pytest

from kvforge.cli.main import main
from tests.conftest import shared_path


def _reference():
    return json.loads(shared_path("reference_numbers.json").read_text())["stories260K"]


@pytest.mark.parametrize("decode", ["static", "dynamic"])
def test_generate_from_bos_reproduces_the_reference_greedy_ids(decode, capsys):
    model = shared_path("stories260K")
    assert main(["generate", str(model), "--max-new-tokens", "64", "--print-ids", "--decode", decode]) == 0
    ids = [int(i) for i in capsys.readouterr().out.strip().split(",")]
    assert ids == _reference()["greedy_65_ids_from_bos"]


def test_generate_continues_a_text_prompt(capsys):
    model = shared_path("stories260K")
    assert main(["generate", str(model), "--prompt", "Once upon a time", "--max-new-tokens", "60"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == _reference()["greedy_65_text"]
    assert "tokens/s" in captured.err and "dynamic decode" in captured.err  # auto on CPU


def test_sampling_with_a_seed_is_reproducible(capsys):
    args = ["generate", str(shared_path("stories260K")), "--max-new-tokens", "24", "--temperature", "1.0"]
    args += ["--top-k", "40", "--num-samples", "2", "--print-ids"]
    main([*args, "--seed", "3"])
    first = capsys.readouterr().out
    main([*args, "--seed", "3"])
    assert capsys.readouterr().out == first
    assert len(first.strip().splitlines()) == 2


def test_several_eos_ids_any_of_them_stops(capsys):
    reference = _reference()["greedy_65_ids_from_bos"]
    later, sooner = reference[30], reference[12]
    stops = [later, sooner]
    end = min(i for i, token in enumerate(reference) if i > 0 and token in stops)
    args = ["generate", str(shared_path("stories260K")), "--max-new-tokens", "64", "--print-ids"]
    assert main([*args, "--eos-id", str(later), str(sooner)]) == 0
    assert [int(i) for i in capsys.readouterr().out.strip().split(",")] == reference[: end + 1]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ids", "1,x"], "--ids='1,x': expected comma-separated integers"),
        (["--max-new-tokens", "0"], "--max-new-tokens=0 must be positive"),
    ],
)
def test_bad_arguments_are_clear_errors(extra, message, capsys):
    assert main(["generate", str(shared_path("stories260K")), *extra]) == 2
    assert message in capsys.readouterr().err
