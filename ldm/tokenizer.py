"""The SD-1.4 prompt tokenizer: CLIP byte-level BPE, 77 tokens, BOS 49406, padded with EOS 49407.

The runtime tokenizer is transformers' `CLIPTokenizer`, fed either from a model directory's
`tokenizer/vocab.json` + `merges.txt` or from the CLIP BPE merge list bundled in ldm/data
(MIT licence beside it), from which vocab.json and merges.txt are derived deterministically
(WEIGHTS.md §5.3): the 256 byte symbols, the same with `</w>`, one entry per merge, then the two
specials. A prompt longer than 75 content tokens is refused with its length; the references
truncate silently, which edits a different prompt from the one the user wrote.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ldm.errors import PromptError, WeightsError

BOS = 49406
EOS = 49407  # also the padding id: SD-1.4 was trained with EOS padding, not 0 or "!"
MAX_LENGTH = 77
MAX_CONTENT_TOKENS = MAX_LENGTH - 2
N_MERGES = 49152 - 256 - 2  # CLIP uses the first 48,894 merges of the 262,144-line file


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character table, in its canonical order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@lru_cache(maxsize=1)
def bundled_vocab_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    """vocab (token -> id) and merges ("a b" lines) derived from the bundled BPE merge list."""
    data = resources.files("ldm").joinpath("data/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = tuple(lines[1 : 1 + N_MERGES])  # line 0 is the "#version" header
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def write_bundled_tokenizer(directory: str | Path) -> None:
    """Write vocab.json + merges.txt derived from the bundled data (for single-file checkpoints)."""
    from ldm.files import write_bytes

    vocab, merges = bundled_vocab_and_merges()
    directory = Path(directory)
    write_bytes(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    write_bytes(directory / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))


class Tokenizer:
    """Prompts -> (B, 77) token ids, SD-1.4's convention, never truncating."""

    def __init__(self, hf_tokenizer) -> None:  # a transformers CLIPTokenizer
        self.hf = hf_tokenizer

    @classmethod
    def bundled(cls) -> "Tokenizer":
        from transformers import CLIPTokenizer

        vocab, merges = bundled_vocab_and_merges()
        pairs = [tuple(m.split()) for m in merges]
        return cls(CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=MAX_LENGTH))

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        from transformers import CLIPTokenizer

        directory = Path(directory)
        for name in ("vocab.json", "merges.txt"):
            if not (directory / name).is_file():
                raise WeightsError(f"tokenizer file {directory / name} is missing")
        hf = CLIPTokenizer(
            vocab=str(directory / "vocab.json"), merges=str(directory / "merges.txt"), model_max_length=MAX_LENGTH
        )
        return cls(hf)

    def content_ids(self, prompt: str) -> list[int]:
        """BPE ids of the prompt without BOS/EOS."""
        return self.hf(prompt, add_special_tokens=False).input_ids

    def decode_token(self, token_id: int) -> str:
        """One token's text without the `</w>` end-of-word marker (for word alignment)."""
        return self.hf.decode([token_id]).strip()

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        rows = []
        for prompt in prompts:
            ids = self.content_ids(prompt)
            if len(ids) > MAX_CONTENT_TOKENS:
                raise PromptError(
                    f"prompt has {len(ids)} tokens, more than the {MAX_CONTENT_TOKENS} SD-1.4 can read: {prompt!r}"
                )
            rows.append([BOS, *ids, EOS] + [EOS] * (MAX_CONTENT_TOKENS - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
