"""A real `transformers.CLIPTokenizer` built offline, for the stand-in text towers (no hub).

CLIP's byte-level alphabet (every byte's character, alone and with the end-of-word mark "</w>"), BPE merges
learnt on a small prompt vocabulary so common prompt words are one token, and CLIP's two specials. Any other
text still tokenizes, into characters, as CLIP's tokenizer falls back. The BPE itself is
spo.models.offline_clip_tokenizer (shared with the digits world).
"""

from __future__ import annotations

import re

from transformers import CLIPTokenizer

from spo.models.offline_clip_tokenizer import EOS, build_vocab, learn_merges

MODEL_MAX_LENGTH = 77  # CLIP's context length, as in SD1.5, SDXL and PickScore
COMMON_WORDS = ("a an the of in on at with and under by made wearing riding photo painting art style detailed "
                "portrait landscape city night snow forest sky water light dark red blue green golden").split()


def prompt_words(texts: list[str] | tuple[str, ...]) -> list[str]:
    """Lower-case words of `texts` (CLIP lower-cases and splits off punctuation too)."""
    return sorted({w for text in texts for w in re.findall(r"[a-z0-9]+", text.lower())} | set(COMMON_WORDS))


def build_clip_tokenizer(words: list[str], *, pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIPTokenizer (77 tokens) whose merges make each of `words` one token.

    pad_token: SD1.5's tokenizer pads with EOS; SDXL's tokenizer_2 and laion's ViT-H pad with "!" (open_clip's 0).
    """
    merges = learn_merges(words)
    return CLIPTokenizer(vocab=build_vocab(merges), merges=merges, model_max_length=MODEL_MAX_LENGTH,
                         pad_token=pad_token)
