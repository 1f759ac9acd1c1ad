"""The bundled CLIP BPE data gives SD-1.4's tokenizer: the same vocab/merges files as the oracle
pipeline's tokenizer folder, the known ids, EOS padding, and a clear error past 75 tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.errors import PromptError, WeightsError
from ldm.tokenizer import Tokenizer, write_bundled_tokenizer

ORACLE_TOKENIZER = Path(__file__).parent / "data" / "tiny-sd" / "tokenizer"


@pytest.fixture(scope="module")
def bundled() -> Tokenizer:
    return Tokenizer.bundled()


def test_derived_files_equal_the_reference_tokenizer_files(tmp_path):
    write_bundled_tokenizer(tmp_path)
    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads((ORACLE_TOKENIZER / "vocab.json").read_text())
    assert (tmp_path / "merges.txt").read_text() == (ORACLE_TOKENIZER / "merges.txt").read_text()


def test_known_ids_and_eos_padding(bundled):
    ids = bundled(["a photo of a cat", "a photograph of an astronaut riding a horse"])
    assert ids.shape == (2, 77)
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids[1, :11].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407, 49407]
    assert set(ids[0, 6:].tolist()) == {49407}


def test_bundled_and_folder_tokenizers_agree_with_transformers(bundled):
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(ORACLE_TOKENIZER))
    folder = Tokenizer.from_dir(ORACLE_TOKENIZER)
    prompts = ["A ROUND cake, with orange-frosting!", "  two   spaces\tand tabs ", "", "naïve café 123"]
    expected = hf(prompts, padding="max_length", max_length=77).input_ids
    assert bundled(prompts).tolist() == expected
    assert folder(prompts).tolist() == expected


def test_prompt_over_75_tokens_is_refused_with_its_length(bundled):
    assert bundled(["cat " * 75]).shape == (1, 77)  # exactly 75 content tokens fits
    with pytest.raises(PromptError, match="76 tokens"):
        bundled(["cat " * 76])


def test_missing_tokenizer_files_are_an_error(tmp_path):
    with pytest.raises(WeightsError, match="vocab.json"):
        Tokenizer.from_dir(tmp_path)
