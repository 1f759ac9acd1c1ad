"""The prompt tokenizer: CLIP byte-level BPE, 77 tokens, BOS 49406, EOS 49407, then padding.

The runtime tokenizer is transformers' `CLIPTokenizer`, fed either from a tokenizer folder in any
format transformers writes (`vocab.json` + `merges.txt` with `special_tokens_map.json` /
`tokenizer_config.json` / `added_tokens.json`, or `tokenizer.json`, the only vocabulary file
transformers 5 saves), or from the CLIP BPE merge list bundled in ldm/data (MIT licence beside it),
from which vocab.json and merges.txt are derived deterministically: the 256 byte
symbols, the same with `</w>`, one entry per merge, then the two specials.

The padding token is the one thing SD-1 and SD-2 tokenize differently: SD-1 was trained with EOS
padding, SD-2 with id 0 ("!"; its tokenizer files say so, and OpenCLIP pads with 0). It is a
setting of the model (TextConfig.pad_token), passed in by the caller. A prompt longer than 75
content tokens is refused with its length; the references truncate silently, which edits a
different prompt from the one the user wrote.
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
EOS = 49407  # SD-1's padding id too
EOS_TOKEN = "<|endoftext|>"
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


def write_bundled_tokenizer(directory: str | Path, pad_token: str = EOS_TOKEN) -> None:
    """Write vocab.json + merges.txt derived from the bundled data (for single-file checkpoints),
    and special_tokens_map.json naming the padding token, so the folder says how it pads."""
    from ldm.files import write_bytes, write_json

    vocab, merges = bundled_vocab_and_merges()
    directory = Path(directory)
    write_bytes(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
    write_bytes(directory / "merges.txt", ("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"))
    specials = {"bos_token": "<|startoftext|>", "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN}
    write_json(directory / "special_tokens_map.json", {**specials, "pad_token": pad_token})


def _token_content(value: object) -> str | None:
    """A special token as the files store it: a string or an AddedToken dict with `content`."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def declared_pad_token(directory: str | Path) -> str | None:
    """The padding token a tokenizer folder names, None if no file names one.

    Looked up where transformers reads it, in its order of precedence: special_tokens_map.json
    over tokenizer_config.json (SD-2.x's own folders say "<|endoftext|>" in the latter and "!" in
    the former, and load as "!"), then the `padding` section of tokenizer.json.
    """
    directory = Path(directory)
    for name, find in (
        ("special_tokens_map.json", lambda d: d.get("pad_token")),
        ("tokenizer_config.json", lambda d: d.get("pad_token")),
        ("tokenizer.json", lambda d: (d.get("padding") or {}).get("pad_token")),
    ):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise WeightsError(f"{path}: unreadable tokenizer file ({err})") from None
        token = _token_content(find(data)) if isinstance(data, dict) else None
        if token is not None:
            return token
    return None


def has_tokenizer_files(directory: str | Path) -> bool:
    """Whether a folder holds a vocabulary transformers can read: tokenizer.json, or vocab.json
    with merges.txt."""
    directory = Path(directory)
    return (directory / "tokenizer.json").is_file() or all(
        (directory / name).is_file() for name in ("vocab.json", "merges.txt")
    )


class Tokenizer:
    """Prompts -> (B, 77) token ids: BOS, content, EOS, then the model's padding; never truncating."""

    def __init__(self, hf_tokenizer, where: str = "tokenizer") -> None:  # a transformers CLIPTokenizer
        self.hf = hf_tokenizer
        ids = {"<|startoftext|>": BOS, EOS_TOKEN: EOS}
        for token, want in ids.items():  # words.py and the rows below rely on these two ids
            got = hf_tokenizer.convert_tokens_to_ids(token)
            if got != want:
                raise WeightsError(f"{where}: {token} has id {got}, expected {want} (not a CLIP tokenizer)")
        self.pad_token: str = hf_tokenizer.pad_token
        self.pad_id: int = hf_tokenizer.pad_token_id

    @classmethod
    def bundled(cls, pad_token: str = EOS_TOKEN) -> "Tokenizer":
        from transformers import CLIPTokenizer

        vocab, merges = bundled_vocab_and_merges()
        pairs = [tuple(m.split()) for m in merges]
        hf = CLIPTokenizer(vocab=dict(vocab), merges=pairs, model_max_length=MAX_LENGTH, pad_token=pad_token)
        return cls(hf, "bundled CLIP tokenizer")

    @classmethod
    def from_dir(cls, directory: str | Path, pad_token: str | None = None) -> "Tokenizer":
        """Read a tokenizer folder in any format transformers writes; pad_token None takes the
        one the folder names (EOS when it names none)."""
        from transformers import CLIPTokenizer

        directory = Path(directory)
        if not has_tokenizer_files(directory):
            raise WeightsError(f"{directory}: no tokenizer files (expected tokenizer.json, or vocab.json + merges.txt)")
        pad = pad_token or declared_pad_token(directory) or EOS_TOKEN
        try:
            hf = CLIPTokenizer.from_pretrained(
                str(directory), model_max_length=MAX_LENGTH, pad_token=pad, local_files_only=True
            )
        except Exception as err:  # transformers raises many types for unreadable files
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsError(f"{directory}: unreadable tokenizer files ({first})") from None
        return cls(hf, str(directory))

    def __len__(self) -> int:
        """Vocabulary size including added tokens (the text encoder needs one row per id)."""
        return len(self.hf)

    def check_fits(self, vocab_size: int, where: str) -> None:
        """Every id this tokenizer can emit must index the text encoder's embedding table."""
        if len(self) > vocab_size:
            raise WeightsError(
                f"{where}: the tokenizer has {len(self)} tokens (padding {self.pad_token!r} is id {self.pad_id}) "
                f"but the text encoder embeds only {vocab_size}"
            )

    def content_ids(self, prompt: str) -> list[int]:
        """BPE ids of the prompt without BOS/EOS."""
        # verbose=False: an over-long prompt is refused with our own line, not transformers' warning
        return self.hf(prompt, add_special_tokens=False, verbose=False).input_ids

    def decode_token(self, token_id: int) -> str:
        """One token's text without the `</w>` end-of-word marker (for word alignment)."""
        return self.hf.decode([token_id]).strip()

    def __call__(self, prompts: Sequence[str]) -> Tensor:
        rows = []
        for prompt in prompts:
            ids = self.content_ids(prompt)
            if len(ids) > MAX_CONTENT_TOKENS:
                limit = f"more than the {MAX_CONTENT_TOKENS} the text encoder can read"
                raise PromptError(f"prompt has {len(ids)} tokens, {limit}: {prompt!r}")
            rows.append([BOS, *ids, EOS] + [self.pad_id] * (MAX_CONTENT_TOKENS - len(ids)))
        return torch.tensor(rows, dtype=torch.long)
