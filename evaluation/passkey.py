"""Passkey retrieval: can the model read back a number hidden in a long stretch of filler text?

The format is the passkey test of Mohtashami & Jaggi (2023, "Landmark Attention"): a haystack of
filler sentences, one needle ``The pass key is 71432. Remember it. 71432 is the pass key.`` at a
chosen depth (0 = the start of the haystack, 1 = just before the question), and the question
``What is the pass key? The pass key is``. The model answers by greedy decoding and scores only when
every answer token is exactly right.

Everything is generated locally: a sample depends only on (seed, context, depth, trial), so two runs
with the same seed see the same prompts. Each piece is tokenized separately with a leading space
(the natural word boundary for both sentencepiece and byte-level BPE tokenizers) and concatenated at
the token level, so prompt lengths are exact. Models too small to have learnt retrieval in
pre-training can learn this format in a short fine-tune (:mod:`.passkey_finetune`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from kvforge.arch import CausalLM, generate
from kvforge.evaluation.schema import documented

# The filler of the original passkey test: meaningless, repetitive, and the same for every model.
CLASSIC_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeySettings:
    contexts: list[int] | None = documented(
        "prompt + answer lengths in tokens; null = powers of two from 128 up to max_seq_len", None
    )
    depths: list[float] = documented(
        "needle positions as a fraction of the haystack (0 = start, 1 = end)",
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
    )
    trials: int = documented("prompts per (context, depth) cell, each with its own random key", 5)
    key_digits: int = documented("digits of the pass key", 5)
    seed: int = documented("seed of the generator: the same seed gives the same prompts", 0)
    filler: str = documented(
        "source of the haystack sentences ('classic' = the original filler, or a file path)", "classic"
    )


@dataclass
class PasskeySample:
    prompt_ids: list[int]
    answer_ids: list[int]
    key: str
    context: int
    depth: float
    needle_start: int  # token index of the needle in the prompt


@dataclass
class PasskeyCell:
    context: int = documented("prompt + answer length in tokens")
    depth: float = documented("needle position as a fraction of the haystack (0 = start, 1 = end)")
    n_trials: int = documented("prompts in this cell")
    n_correct: int = documented("prompts whose greedy answer matched every token of the key")
    accuracy: float = documented("n_correct / n_trials")


@dataclass
class PasskeyReport:
    settings: PasskeySettings = documented("how the prompts were generated")
    cells: list[PasskeyCell] = documented("one entry per (context, depth)")
    accuracy: float = documented("exact-match accuracy over every prompt of every cell")


class PasskeyTask:
    """Builds passkey prompts for one tokenizer."""

    def __init__(self, tokenizer, filler: str = CLASSIC_FILLER, key_digits: int = 5) -> None:
        if key_digits < 1:
            raise ValueError(f"key_digits={key_digits} must be at least 1")
        sentences = [s for s in re.split(r"(?<=[.!?])\s+", filler.strip()) if s]
        if not sentences:
            raise ValueError("passkey filler text is empty")
        self.tokenizer = tokenizer
        self.key_digits = key_digits
        self.sentences = [self._encode(s) for s in sentences]
        self.question = self._encode(QUESTION)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(" " + text, add_special_tokens=False)

    def sample(self, context: int, depth: float, rng: random.Random) -> PasskeySample:
        """One prompt whose length plus the answer's is exactly ``context`` tokens."""
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth={depth} must be in [0, 1]")
        key = "".join(rng.choice("0123456789") for _ in range(self.key_digits))
        needle = self._encode(NEEDLE.format(key=key))
        answer = self._encode(key)
        n_filler = context - len(answer) - len(needle) - len(self.question)
        if n_filler < 0:
            raise ValueError(
                f"context={context} is too short for a passkey prompt: needle, question and answer "
                f"alone take {context - n_filler} tokens"
            )
        filler, boundaries = self._haystack(n_filler, rng.randrange(len(self.sentences)))
        # Snap the needle to the sentence boundary nearest the requested depth.
        cut = min(boundaries, key=lambda b: abs(b - depth * n_filler))
        prompt = filler[:cut] + needle + filler[cut:] + self.question
        return PasskeySample(prompt, answer, key, context, depth, cut)

    def _haystack(self, n_tokens: int, first: int) -> tuple[list[int], list[int]]:
        """The last ``n_tokens`` of a run of filler sentences (the first one may be cut), and the
        token offsets of its sentence boundaries (0 and ``n_tokens`` included)."""
        pieces: list[list[int]] = []
        total, index = 0, first
        while total < n_tokens:
            sentence = self.sentences[index % len(self.sentences)]
            pieces.append(sentence)
            total += len(sentence)
            index += 1
        # Built front to back, then trimmed at the front so the haystack ends on a whole sentence.
        stream = [token for piece in pieces for token in piece][total - n_tokens :]
        boundaries, offset = [n_tokens], n_tokens
        for piece in reversed(pieces):
            offset -= len(piece)
            boundaries.append(max(0, offset))
        return stream, sorted(set(boundaries))

    def samples(self, context: int, depth: float, trials: int, seed: int) -> list[PasskeySample]:
        # A string seed is hashed with SHA-512 by `random`: stable across processes and platforms.
        return [
            self.sample(context, depth, random.Random(f"{seed}/{context}/{depth}/{t}")) for t in range(trials)
        ]


def is_exact_match(generated_ids: list[int], answer_ids: list[int]) -> bool:
    """Exact match only: every answer token, in order, and nothing missing."""
    return list(generated_ids[: len(answer_ids)]) == list(answer_ids) and len(generated_ids) >= len(
        answer_ids
    )


@torch.no_grad()
def answer(model: CausalLM, samples: list[PasskeySample], batch_size: int = 8) -> list[list[int]]:
    """Greedy answers (as many tokens as each key has), batching prompts of equal shape."""
    device = model.model.embed_tokens.weight.device
    answers: list[list[int] | None] = [None] * len(samples)
    shapes: dict[tuple[int, int], list[int]] = {}
    for index, sample in enumerate(samples):
        shapes.setdefault((len(sample.prompt_ids), len(sample.answer_ids)), []).append(index)
    for (_, n_answer), indices in shapes.items():
        for first in range(0, len(indices), batch_size):
            chunk = indices[first : first + batch_size]
            prompts = torch.tensor([samples[i].prompt_ids for i in chunk], device=device)
            out = generate(model, prompts, n_answer)[:, prompts.shape[1] :]
            for row, index in enumerate(chunk):
                answers[index] = out[row].tolist()
    return answers


def retrieval_accuracy(
    model: CausalLM, task: PasskeyTask, settings: PasskeySettings, batch_size: int = 8
) -> PasskeyReport:
    """Exact-match accuracy for every (context, depth) cell of ``settings`` (contexts resolved)."""
    if not settings.contexts:
        raise ValueError("PasskeySettings.contexts must list at least one context length")
    was_training = model.training
    model.eval()
    cells, correct, total = [], 0, 0
    for context in settings.contexts:
        for depth in settings.depths:
            samples = task.samples(context, depth, settings.trials, settings.seed)
            hits = sum(
                is_exact_match(a, s.answer_ids) for a, s in zip(answer(model, samples, batch_size), samples)
            )
            cells.append(PasskeyCell(context, depth, len(samples), hits, hits / len(samples)))
            correct, total = correct + hits, total + len(samples)
    model.train(was_training)
    return PasskeyReport(settings, cells, correct / total)
