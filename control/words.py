"""Words of a prompt -> CLIP token positions, and the Prompt-to-Prompt token alignments.

docs/methods/prompt-to-prompt.md: "Words to token positions", "The cross-replace schedule" (with
per-word windows), "Replace" (the replacement mapper), "Refine" (the refinement mapper:
Needleman-Wunsch alignment of the token ids) and "Reweight" (the equalizer). It reproduces the
reference (google/prompt-to-prompt `seq_aligner.py` / `ptp_utils.py`, identical in PnPInversion)
including its quirks: words are whitespace-separated pieces of the prompt matched by
exact, case-sensitive string equality ("cat," is one word, so "cat" is not found in "a cat, a dog"),
a multi-token word yields all its token positions, and a repeated word yields every occurrence.
One deliberate difference: whitespace is normalised first (the reference's empty words from double
spaces shift every later word by one token, silently). Missing words and unalignable prompts raise
PromptError instead of the reference's silent no-ops and IndexErrors.

Positions count BOS as 0, so the first word's first token is 1; tensors are 77 wide.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch
from torch import Tensor

from ldm.errors import PromptError
from ldm.tokenizer import BOS, EOS, MAX_CONTENT_TOKENS, MAX_LENGTH, Tokenizer

Bounds = float | tuple[float, float]


def normalize(prompt: str) -> str:
    """Single spaces between words, none at the ends (what the word lookup assumes)."""
    return " ".join(prompt.split())


def strip_brackets(prompt: str) -> str:
    """PIE-Bench prompts mark the edited words with [ ]; the reference deletes the brackets."""
    return normalize(re.sub(r"[\[\]]", "", prompt))


def token_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """BOS + content ids + EOS, unpadded; refuses prompts SD-1.4 cannot read whole."""
    ids = tokenizer.content_ids(prompt)
    if len(ids) > MAX_CONTENT_TOKENS:
        raise PromptError(f"prompt has {len(ids)} tokens, more than the {MAX_CONTENT_TOKENS} SD-1.4 can read: {prompt!r}")
    return [BOS, *ids, EOS]


def word_positions(tokenizer: Tokenizer, prompt: str, word: str | int) -> list[int]:
    """Token positions of a word (every occurrence) or of the word at a given word index.

    Each word owns the tokens the tokenizer makes of it alone: CLIP splits text at whitespace
    before byte-pair encoding, so the prompt's tokens are its words' tokens one after another. The
    reference instead decodes every token on its own and counts characters, which miscounts the
    byte tokens of accented and non-Latin characters (in "a Straße cat" it gives `cat` two
    tokens); for plain ASCII words both give the same positions.
    """
    prompt = normalize(prompt)
    words = prompt.split(" ")
    wanted = [i for i, w in enumerate(words) if w == word] if isinstance(word, str) else [word]
    if not wanted:
        return []
    ids = token_ids(tokenizer, prompt)[1:-1]
    per_word = [tokenizer.content_ids(w) for w in words]
    if [t for w in per_word for t in w] != ids:  # a tokenizer that merges across spaces
        raise PromptError(f"cannot align the tokens of {prompt!r} with its words")
    out: list[int] = []
    start = 1  # position 0 is BOS
    for k, tokens in enumerate(per_word):
        if k in wanted:
            out.extend(range(start, start + len(tokens)))
        start += len(tokens)
    return out


def require_word(tokenizer: Tokenizer, prompt: str, word: str, what: str) -> list[int]:
    """word_positions, refusing a word that is not in the prompt (the reference ignores it silently)."""
    found = word_positions(tokenizer, prompt, word)
    if not found:
        raise PromptError(
            f"{what} word {word!r} is not a word of the prompt {normalize(prompt)!r} "
            "(words are matched exactly, case and punctuation included)"
        )
    return found


def refinement_mapper(tokenizer: Tokenizer, source: str, target: str) -> tuple[Tensor, Tensor]:
    """(mapper, alphas), both 77 long: target token n reads source column mapper[n] where alphas[n] = 1.

    Global alignment of the token ids (gap 0, match +1, mismatch -1; ties take left, then up), so a
    substituted word is deleted and inserted: its target tokens get alphas 0 (keep their own map).
    Padding positions n >= len(target ids) map to n, as the reference does.
    """
    x, y = token_ids(tokenizer, normalize(source)), token_ids(tokenizer, normalize(target))
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    move = [[1] * (len(y) + 1) for _ in range(len(x) + 1)]  # 1 left, 2 up, 3 diagonal
    for i in range(1, len(x) + 1):
        move[i][0] = 2
        for j in range(1, len(y) + 1):
            left, up = score[i][j - 1], score[i - 1][j]
            diag = score[i - 1][j - 1] + (1 if x[i - 1] == y[j - 1] else -1)
            best = max(left, up, diag)
            score[i][j] = best
            move[i][j] = 1 if best == left else 2 if best == up else 3
    pairs: list[tuple[int, int]] = []  # (target position, source position or -1)
    i, j = len(x), len(y)
    while i > 0 or j > 0:
        if move[i][j] == 3:
            i, j = i - 1, j - 1
            pairs.append((j, i))
        elif move[i][j] == 1:
            j -= 1
            pairs.append((j, -1))
        else:
            i -= 1
    pairs.reverse()
    mapper = torch.arange(MAX_LENGTH, dtype=torch.long)
    alphas = torch.ones(MAX_LENGTH)
    for n, (_, src) in enumerate(pairs):
        mapper[n] = src
        alphas[n] = float(src != -1)
    return mapper, alphas


def replacement_mapper(tokenizer: Tokenizer, source: str, target: str) -> Tensor:
    """(77, 77) matrix M, rows source positions, columns target positions
    (docs/methods/prompt-to-prompt.md "Replace").

    Differing words map all their tokens onto each other (1/n weights when the token counts
    differ). After the last differing word the reference writes M[j, j] (target position for the
    row, its quirk), kept here so results equal the reference's.
    """
    source, target = normalize(source), normalize(target)
    words_x, words_y = source.split(" "), target.split(" ")
    if len(words_x) != len(words_y):
        raise PromptError(
            f"a replace edit needs prompts with the same number of words; {source!r} has {len(words_x)}, "
            f"{target!r} has {len(words_y)} (use the refine edit, --control p2p)"
        )
    token_ids(tokenizer, source), token_ids(tokenizer, target)  # length check
    changed = [k for k in range(len(words_y)) if words_x[k] != words_y[k]]
    src_pos = [word_positions(tokenizer, source, k) for k in changed]
    tgt_pos = [word_positions(tokenizer, target, k) for k in changed]
    m = torch.zeros(MAX_LENGTH, MAX_LENGTH)
    i = j = cur = 0
    while i < MAX_LENGTH and j < MAX_LENGTH:
        if cur < len(src_pos) and src_pos[cur][0] == i:
            s, t = src_pos[cur], tgt_pos[cur]
            if len(s) == len(t):
                m[s, t] = 1.0
            else:
                for t_pos in t:
                    m[s, t_pos] = 1.0 / len(t)
            cur += 1
            i, j = i + len(s), j + len(t)
        elif cur < len(src_pos):
            m[i, j] = 1.0
            i, j = i + 1, j + 1
        else:
            m[j, j] = 1.0
            i, j = i + 1, j + 1
    return m


def cross_replace_schedule(
    tokenizer: Tokenizer, target: str, num_steps: int, cross: Bounds | Mapping[str, Bounds]
) -> Tensor:
    """alpha (num_steps + 1, 77): 1 where the target's cross-attention column is edited at step i.

    A float c means steps [0, int(c * (num_steps + 1))) -- the reference's 51, not 50, for 50
    steps. A dict may give per-target-word windows under word keys; "default_" sets the rest
    (missing: the whole run).
    """
    spec: dict[str, Bounds] = dict(cross) if isinstance(cross, Mapping) else {"default_": cross}
    spec.setdefault("default_", (0.0, 1.0))
    rows = num_steps + 1
    alpha = torch.zeros(rows, MAX_LENGTH)

    def fill(bounds: Bounds, cols: Sequence[int] | slice) -> None:
        lo, hi = (0.0, bounds) if isinstance(bounds, (int, float)) else bounds
        start, end = int(lo * rows), int(hi * rows)
        alpha[:, cols] = 0.0
        alpha[start:end, cols] = 1.0

    fill(spec["default_"], slice(None))
    for word, bounds in spec.items():
        if word != "default_":
            fill(bounds, require_word(tokenizer, target, word, "--cross-word"))
    return alpha


def equalizer(tokenizer: Tokenizer, target: str, weights: Mapping[str, float]) -> Tensor:
    """(77,) ones, with the target's token columns of each word scaled by its weight ("Reweight")."""
    eq = torch.ones(MAX_LENGTH)
    for word, value in weights.items():
        eq[require_word(tokenizer, target, word, "--reweight")] = float(value)
    return eq
