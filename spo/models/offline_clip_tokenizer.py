"""CLIP's byte-level BPE built offline: a real `transformers.CLIPTokenizer` vocabulary without the hub.

The byte alphabet (every byte's character, alone and with the end-of-word mark "</w>"), BPE merges learnt
on given words so each is one token, and CLIP's two specials; any other text still tokenizes into
characters, as CLIP's tokenizer falls back. Used by the digits world and the stand-ins.
"""

from __future__ import annotations

from collections import Counter

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"


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
