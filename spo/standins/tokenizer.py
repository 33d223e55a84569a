"""A real `transformers.CLIPTokenizer` built offline, for the stand-in text towers (no hub).

CLIP's byte-level alphabet (every byte's character, alone and with the end-of-word mark "</w>"), BPE merges
learnt on a small prompt vocabulary so common prompt words are one token, and CLIP's two specials. Any other
text still tokenizes, into characters, as CLIP's tokenizer falls back. Kept apart from spo.digits so the
stand-ins depend on nothing but the libraries.
"""

from __future__ import annotations

import re
from collections import Counter

from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 77  # CLIP's context length, as in SD1.5, SDXL and PickScore
COMMON_WORDS = ("a an the of in on at with and under by made wearing riding photo painting art style detailed "
                "portrait landscape city night snow forest sky water light dark red blue green golden").split()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (the byte-level alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def prompt_words(texts: list[str] | tuple[str, ...]) -> list[str]:
    """Lower-case words of `texts` (CLIP lower-cases and splits off punctuation too)."""
    return sorted({w for text in texts for w in re.findall(r"[a-z0-9]+", text.lower())} | set(COMMON_WORDS))


def _symbols(word: str, alphabet: dict[int, str]) -> list[str]:
    chars = [alphabet[b] for b in word.encode("utf-8")]
    return chars[:-1] + [chars[-1] + END_OF_WORD]


def _merge(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE: merge the most frequent adjacent pair until every word is one symbol (ties broken
    lexicographically, so the merges and the vocabulary ids are deterministic)."""
    alphabet = bytes_to_unicode()
    segments = {w: _symbols(w, alphabet) for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segments.values()):
        counts = Counter(pair for s in segments.values() for pair in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        segments = {w: _merge(s, best) for w, s in segments.items()}
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte characters, the same with "</w>", merged symbols, then BOS and EOS last (CLIP's order)."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def build_clip_tokenizer(words: list[str], *, pad_token: str = EOS) -> CLIPTokenizer:
    """A CLIPTokenizer (77 tokens) whose merges make each of `words` one token.

    pad_token: SD1.5's tokenizer pads with EOS; SDXL's tokenizer_2 and laion's ViT-H pad with "!" (open_clip's 0).
    """
    merges = learn_merges(words)
    return CLIPTokenizer(vocab=build_vocab(merges), merges=merges, model_max_length=MODEL_MAX_LENGTH,
                         pad_token=pad_token)
