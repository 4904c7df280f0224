"""Import/export parity with stock transformers, per family: the numbers behind the conversion tests.

    python -m benchmarks.hf_parity [--markdown]

For each tiny random checkpoint that transformers itself builds (tests/conversion/hf_tiny.py) and for
the real ../shared/data/stories260K: max |logit difference| between transformers and kvforge after
import, whether 20 greedy tokens agree (transformers' generate vs kvforge's), the family the model
exports to automatically, and max |logit difference| when transformers reloads that export.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import print_table
from kvforge.arch import CausalLM, generate
from kvforge.conversion import load_pretrained, plan_export, save_pretrained
from tests.conversion.hf_tiny import VARIANTS, load_hf, save_hf_model

STORIES = Path(__file__).resolve().parents[2] / "shared" / "data" / "stories260K"


def measure(name: str, source: Path, scratch: Path) -> list[object]:
    hf_model, pretrained = load_hf(source), load_pretrained(source)
    model = CausalLM(pretrained.config).eval()
    model.load_state_dict(pretrained.state_dict)
    vocab = pretrained.config.vocab_size
    ids = torch.randint(3, vocab, (2, 48), generator=torch.Generator().manual_seed(0))
    prompt = ids[:1, :6]
    family = plan_export(pretrained.config).family.model_type
    out = save_pretrained(pretrained.config, pretrained.state_dict, scratch / f"{name}-export")
    with torch.no_grad():
        import_diff = (hf_model(ids).logits - model(ids)).abs().max().item()
        export_diff = (load_hf(out)(ids).logits - model(ids)).abs().max().item()
    same = hf_model.generate(prompt, max_new_tokens=20, do_sample=False, eos_token_id=None).tolist() == (
        generate(model, prompt, 20).tolist()
    )
    return [
        name,
        pretrained.family,
        f"{import_diff:.1e}",
        "yes" if same else "NO",
        family,
        f"{export_diff:.1e}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = parser.parse_args()
    columns = [
        "checkpoint",
        "imported as",
        "max |Δlogits|",
        "greedy 20 equal",
        "exports to",
        "reload |Δlogits|",
    ]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for variant in VARIANTS:
            rows.append(measure(variant, save_hf_model(variant, scratch / variant), scratch))
        if STORIES.is_dir():
            rows.append(measure("stories260K (real)", STORIES, scratch))
    print_table(
        "kvforge vs transformers 5 on the same directory (fp32, CPU)", columns, rows, markdown=args.markdown
    )


if __name__ == "__main__":
    main()
