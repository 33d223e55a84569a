"""A real `transformers.CLIPTokenizer` for the digits world, built locally (no hub).

It has CLIP's byte-level alphabet (every byte's character, alone and with the end-of-word mark "</w>"),
BPE merges learnt on our caption words so each of them is one token, and CLIP's two specials. Any other
word still tokenizes, into its characters, exactly as CLIP's tokenizer would fall back.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from spo.digits.captions import caption_words
from spo.models.offline_clip_tokenizer import build_vocab, learn_merges

MODEL_MAX_LENGTH = 16  # BOS + 14 words + EOS: our longest caption has 9 words


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
