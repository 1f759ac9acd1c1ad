"""Word -> token positions and the P2P alignments on the real CLIP tokenizer
(docs/methods/prompt-to-prompt.md: "Words to token positions", "Refine", "Replace", "Reweight",
"The cross-replace schedule").

Expected values are worked out by hand from the tokenisations printed in each test's comment and
from worked examples obtained by running the reference code (google/prompt-to-prompt
`seq_aligner.py`, `ptp_utils.py`).
"""

import pytest
import torch

from control.words import (
    cross_replace_schedule,
    equalizer,
    normalize,
    refinement_mapper,
    replacement_mapper,
    require_word,
    strip_brackets,
    word_positions,
)
from ldm.errors import PromptError
from ldm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.bundled()


def test_tokenisations_the_cases_rely_on(tok):
    assert [tok.decode_token(i) for i in tok.content_ids("a tiramisu on a plate")] == [
        "a", "ti", "ram", "isu", "on", "a", "plate"]
    assert [tok.decode_token(i) for i in tok.content_ids("a cat, a dog.")] == ["a", "cat", ",", "a", "dog", "."]


def test_multi_token_word_gives_all_its_positions(tok):
    assert word_positions(tok, "a tiramisu on a plate", "tiramisu") == [2, 3, 4]
    assert word_positions(tok, "a tiramisu on a plate", "plate") == [7]
    assert word_positions(tok, "a tiramisu on a plate", 4) == [7]  # by word index


def test_repeated_word_gives_every_occurrence(tok):
    assert word_positions(tok, "a tiramisu on a plate", "a") == [1, 6]


def test_punctuation_belongs_to_the_word_as_in_the_reference(tok):
    assert word_positions(tok, "a cat, a dog.", "cat") == []
    assert word_positions(tok, "a cat, a dog.", "cat,") == [2, 3]
    assert word_positions(tok, "a cat, a dog.", "dog.") == [5, 6]
    assert word_positions(tok, "a cat, a dog.", "a") == [1, 4]


def test_whitespace_is_normalised_and_case_matters(tok):
    # the reference would attribute "cat" to the empty word of the double space and return []
    assert word_positions(tok, "  a  cat ", "cat") == [2]
    assert word_positions(tok, "A cat", "a") == []
    assert word_positions(tok, "A cat", "A") == [1]
    assert normalize(" a \t b  c ") == "a b c"
    assert strip_brackets("a [round] cake  [with] x") == "a round cake with x"


def test_missing_word_is_an_error_naming_it(tok):
    with pytest.raises(PromptError, match="'cat'"):
        require_word(tok, "a cat, a dog.", "cat", "blend")


def test_refinement_mapper_inserted_word(tok):
    mapper, alphas = refinement_mapper(tok, "a cat sitting on a mat", "a black cat sitting on a mat")
    assert mapper[:11].tolist() == [0, 1, -1, 2, 3, 4, 5, 6, 7, 9, 10]
    assert (alphas == 0).nonzero().flatten().tolist() == [2]
    assert mapper[11:].tolist() == list(range(11, 77))


def test_refinement_mapper_substitution_is_deletion_plus_insertion(tok):
    mapper, alphas = refinement_mapper(tok, "a photo of a cat", "a photo of a tiramisu")
    assert mapper[:11].tolist() == [0, 1, 2, 3, 4, -1, -1, -1, 6, 9, 10]
    assert (alphas == 0).nonzero().flatten().tolist() == [5, 6, 7]


def test_refinement_mapper_shorter_target_padding_quirk(tok):
    mapper, alphas = refinement_mapper(tok, "a cat and a dog", "a dog")
    assert mapper[:6].tolist() == [0, 1, 5, 6, 4, 5]
    assert bool((alphas == 1).all())


def test_replacement_mapper_same_token_count_is_identity(tok):
    m = replacement_mapper(tok, "a photo of a cat", "a photo of a dog")
    assert torch.equal(m, torch.eye(77))


def test_replacement_mapper_multi_token_word_uses_one_over_n(tok):
    # source: BOS a photo of a cat on grass EOS; target: ... a ti ram isu on grass EOS
    m = replacement_mapper(tok, "a photo of a cat on grass", "a photo of a tiramisu on grass")
    expected = torch.zeros(77, 77)
    for k in range(5):
        expected[k, k] = 1
    expected[5, 5:8] = 1 / 3
    for k in range(8, 77):  # the reference's M[j, j] after the last replaced word
        expected[k, k] = 1
    assert torch.equal(m, expected)


def test_replace_needs_equal_word_counts(tok):
    with pytest.raises(PromptError, match="same number of words"):
        replacement_mapper(tok, "a cat", "a black cat")


def test_over_long_prompt_is_refused(tok):
    long = " ".join(["cat"] * 80)
    with pytest.raises(PromptError, match="80 tokens"):
        refinement_mapper(tok, long, "a cat")


def test_cross_schedule_uses_num_steps_plus_one(tok):
    alpha = cross_replace_schedule(tok, "a tiramisu on a plate", 50, 0.4)
    assert alpha.shape == (51, 77)
    assert bool((alpha[:20] == 1).all()) and bool((alpha[20:] == 0).all())  # int(0.4 * 51) = 20
    alpha = cross_replace_schedule(tok, "a tiramisu on a plate", 50, {"default_": 0.4, "tiramisu": (0.2, 0.6)})
    assert alpha[:, 2].nonzero().flatten().tolist() == list(range(10, 30))
    assert alpha[:, 5].nonzero().flatten().tolist() == list(range(20))


def test_equalizer_scales_the_target_word_columns(tok):
    eq = equalizer(tok, "a tiramisu on a plate", {"tiramisu": 2.0})
    expected = torch.ones(77)
    expected[[2, 3, 4]] = 2.0
    assert torch.equal(eq, expected)


NON_ASCII = ["a Straße cat", "crème brûlée on a plate", "a café at night", "a Pokémon toy", "a 猫 cat",
             "一只猫 on a sofa", "ÉCLAIR au café", "a naïve señor's piñata", "a cat, a dog."]


def offsets_positions(tok, prompt: str) -> list[list[int]]:
    """Each word's token positions from the tokenizer's own character offsets: a token belongs to
    the word whose characters its offset starts in (position 0 is BOS)."""
    offsets = tok.hf(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans, at = [], 0
    for w in prompt.split(" "):
        spans.append((at, at + len(w)))
        at += len(w) + 1
    return [[i + 1 for i, (s, _) in enumerate(offsets) if a <= s < b] for a, b in spans]


@pytest.mark.parametrize("prompt", NON_ASCII)
def test_accented_and_non_latin_words_get_the_tokens_the_tokenizer_offsets_give(tok, prompt):
    expected = offsets_positions(tok, prompt)
    assert all(expected)  # every word has tokens
    assert [word_positions(tok, prompt, k) for k in range(len(expected))] == expected
    for k, w in enumerate(prompt.split(" ")):  # by word: every occurrence
        assert word_positions(tok, prompt, w) == [p for j, v in enumerate(prompt.split(" ")) if v == w
                                                   for p in expected[j]]


def test_a_word_after_a_sharp_s_is_not_shifted(tok):
    # the reference's character count gives cat [5, 6]
    assert word_positions(tok, "a Straße cat", "cat") == offsets_positions(tok, "a Straße cat")[2] == [6]
