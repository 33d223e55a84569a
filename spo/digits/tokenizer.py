"""A real `transformers.CLIPTokenizer` for the digits world, built locally (no hub).

It has CLIP's byte-level alphabet (every byte's character, alone and with the end-of-word mark "</w>"),
BPE merges learnt on our caption words so each of them is one token, and CLIP's two specials. Any other
word still tokenizes, into its characters, exactly as CLIP's tokenizer would fall back.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from transformers import CLIPTokenizer

from spo.digits.captions import caption_words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
END_OF_WORD = "</w>"
MODEL_MAX_LENGTH = 16  # BOS + 14 words + EOS: our longest caption has 9 words


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


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Plain BPE training: merge the most frequent adjacent pair until every word is one symbol.

    Ties break lexicographically, so the merges (and the vocabulary ids) are deterministic.
    """
    alphabet = bytes_to_unicode()
    segments = {w: _symbols(w, alphabet) for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in segments.values()):
        counts = Counter(pair for s in segments.values() for pair in zip(s, s[1:]))
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        for word, s in segments.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            segments[word] = out
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Byte characters, the same with "</w>", merged symbols, then BOS and EOS last (as in CLIP)."""
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab


def write_tokenizer_files(out_dir: Path, words: list[str] | None = None) -> Path:
    """Write CLIP-format vocab.json and merges.txt for `words` (default: every caption word)."""
    merges = learn_merges(words if words is not None else caption_words())
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(build_vocab(merges), ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return out_dir


def build_tokenizer(work_dir: Path, words: list[str] | None = None) -> CLIPTokenizer:
    """A CLIPTokenizer loaded from the files `write_tokenizer_files` puts in `work_dir`."""
    write_tokenizer_files(work_dir, words)
    return CLIPTokenizer(vocab=str(work_dir / "vocab.json"), merges=str(work_dir / "merges.txt"),
                         model_max_length=MODEL_MAX_LENGTH)
