"""Captions of the digits world: a digit word dropped into a template.

Train templates make the training prompts (and the preference pairs); the held-out eval templates make
the evaluation prompts, so evaluation asks for the same digits in phrasings the models never trained on.
Prompt order is template-major, digit-minor: any first 10·k prompts cover every digit k times.
"""

from __future__ import annotations

import re

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

TRAIN_TEMPLATES = (
    "a handwritten digit {d}",
    "the number {d}, handwritten",
    "a drawing of the digit {d}",
    "{d}, written by hand",
    "the digit {d}",
    "a picture of the number {d}",
    "handwritten {d}",
    "a scanned handwritten digit {d}",
    "an image of the digit {d}",
    "the number {d} written with a pen",
    "a small drawing of the number {d}",
    "a white {d} on a black background",
)

EVAL_TEMPLATES = (
    "a drawing of the number {d}",
    "the handwritten digit {d}",
    "a picture of the handwritten number {d}",
    "{d}, the digit, written by hand",
    "an image of the number {d}, handwritten",
    "the digit {d} written with a pen",
    "the digit {d} on a black background",
    "a scanned image of the digit {d}",
    "a small handwritten number {d}",
    "the number {d}, drawn by hand",
)

_DIGIT_PATTERN = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r")\b", re.IGNORECASE)


def make_caption(template: str, digit: int) -> str:
    if not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0..9, got {digit}")
    return template.format(d=DIGIT_WORDS[digit])


def caption_digit(caption: str) -> int:
    """The digit a caption asks for; ValueError naming the caption if it names none or several."""
    found = {m.lower() for m in _DIGIT_PATTERN.findall(caption)}
    if len(found) != 1:
        what = "no digit word" if not found else f"several digit words {sorted(found)}"
        raise ValueError(f"caption {caption!r}: {what} (expected exactly one of {', '.join(DIGIT_WORDS)})")
    return DIGIT_WORDS.index(found.pop())


def captions_for(templates: tuple[str, ...]) -> list[str]:
    """Every template with every digit, template-major (digits 0..9 cycle fastest)."""
    return [make_caption(t, d) for t in templates for d in range(10)]


def train_captions() -> list[str]:
    return captions_for(TRAIN_TEMPLATES)


def eval_captions() -> list[str]:
    return captions_for(EVAL_TEMPLATES)


def prompt_records(captions: list[str], first_index: int = 0) -> list[dict]:
    """The format of the SPO 4k prompt file: [{"caption": str, "trainset_idx": int}, ...].

    `trainset_idx` numbers the digits world's caption catalogue (train captions, then eval captions).
    """
    return [{"caption": c, "trainset_idx": first_index + i} for i, c in enumerate(captions)]


def caption_words() -> list[str]:
    """Every word (and punctuation mark) of every caption, lower-case: the tokenizer's vocabulary."""
    words: set[str] = set()
    for caption in train_captions() + eval_captions():
        words.update(re.findall(r"[a-z]+|[^\sa-z]+", caption.lower()))
    return sorted(words)
