"""Multi-key needle retrieval (RULER's MK-NIAH, Hsieh et al. 2024): several needles of the same shape in
one haystack, ``One of the special magic numbers for apple is: 71432.``, each for another word; the
question asks for one word's number, so the model must bind a key to its value rather than copy the
only number in sight - what a fixed-size state (linear attention, DeltaNet) finds hardest, since every
needle competes for the same memory.

The queried needle sits at the requested depth; the ``n_keys - 1`` distractors at other sentence
boundaries drawn at random. Prompts are built as the passkey task builds them (:mod:`.passkey`: the
same filler, tokenized per piece, exact lengths, deterministic in ``(seed, context, depth, trial)``),
scored by exact match of the greedy answer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from kvforge.arch import CausalLM
from kvforge.evaluation.schema import documented

from .passkey import CLASSIC_FILLER, PasskeyCell, PasskeySample, PasskeyTask, retrieval_accuracy

NEEDLE = "One of the special magic numbers for {word} is: {key}."
QUESTION = "What is the special magic number for {word}? The special magic number for {word} is"
# Key words: short, common, one or two tokens in small vocabularies.
WORDS = (
    "apple", "river", "garden", "window", "rabbit", "candle", "orange", "forest",
    "kitten", "pencil", "rocket", "flower", "bottle", "dragon", "button", "castle",
)  # fmt: skip


@dataclass
class NeedleSettings:
    contexts: list[int] | None = documented(
        "prompt + answer lengths in tokens; null = the passkey task's contexts", None
    )
    depths: list[float] = documented(
        "queried needle positions as a fraction of the haystack (0 = start, 1 = end)",
        default_factory=lambda: [0.0, 0.5, 1.0],
    )
    n_keys: int = documented("needles per prompt (one queried, the others distractors)", 4)
    trials: int = documented("prompts per (context, depth) cell, each with its own keys", 5)
    key_digits: int = documented("digits of each needle's number", 5)
    seed: int = documented("seed of the generator: the same seed gives the same prompts", 0)


@dataclass
class NeedleReport:
    settings: NeedleSettings = documented("how the prompts were generated")
    cells: list[PasskeyCell] = documented("one entry per (context, depth): the queried needle's depth")
    accuracy: float = documented("exact-match accuracy over every prompt of every cell")


class NeedleTask(PasskeyTask):
    """Builds multi-key needle prompts for one tokenizer (the passkey task's filler and tokenization)."""

    def __init__(self, tokenizer, filler: str = CLASSIC_FILLER, key_digits: int = 5, n_keys: int = 4) -> None:
        super().__init__(tokenizer, filler, key_digits)
        if not 1 <= n_keys <= len(WORDS):
            raise ValueError(f"n_keys={n_keys} must be in 1..{len(WORDS)}")
        self.n_keys = n_keys

    def sample(self, context: int, depth: float, rng: random.Random) -> PasskeySample:
        """One prompt of exactly ``context`` tokens with its answer; the queried needle nearest ``depth``."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth} must be in [0, 1]")
        words = rng.sample(WORDS, self.n_keys)
        keys = ["".join(rng.choice("0123456789") for _ in range(self.key_digits)) for _ in words]
        needles = [self._encode(NEEDLE.format(word=w, key=k)) for w, k in zip(words, keys)]
        question = self._encode(QUESTION.format(word=words[0]))
        answer_ids = self._encode(keys[0])
        n_filler = context - len(answer_ids) - len(question) - sum(len(n) for n in needles)
        if n_filler < 0:
            raise ValueError(
                f"context={context} is too short for {self.n_keys} needles: needles, question and answer "
                f"alone take {context - n_filler} tokens"
            )
        filler, boundaries = self._haystack(n_filler, rng.randrange(len(self.sentences)))
        cuts = [min(boundaries, key=lambda b: abs(b - depth * n_filler))]
        cuts += [rng.choice(boundaries) for _ in needles[1:]]
        # Insert back to front so earlier offsets stay valid (at a shared boundary the queried needle comes last).
        prompt = list(filler)
        for cut, needle in sorted(zip(cuts, needles), key=lambda pair: -pair[0]):
            prompt[cut:cut] = needle
        queried = sum(len(n) for c, n in zip(cuts[1:], needles[1:]) if c <= cuts[0]) + cuts[0]
        return PasskeySample(prompt + question, answer_ids, keys[0], context, depth, queried)


def needle_accuracy(
    model: CausalLM, task: NeedleTask, settings: NeedleSettings, batch_size: int = 8
) -> NeedleReport:
    """Exact-match accuracy for every (context, depth) cell of ``settings`` (contexts resolved): the passkey
    task's scoring loop over this task's prompts."""
    if not settings.contexts:
        raise ValueError("NeedleSettings.contexts must list at least one context length")
    report = retrieval_accuracy(model, task, settings, batch_size)  # reads contexts, depths, trials, seed
    return NeedleReport(settings, report.cells, report.accuracy)
