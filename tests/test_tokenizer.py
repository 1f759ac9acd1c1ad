"""The bundled CLIP BPE data gives SD-1.4's tokenizer: the same vocab/merges files as the oracle
pipeline's tokenizer folder, the known ids, EOS padding, and a clear error past 75 tokens. SD-2's
"!" padding and every folder format transformers writes give what transformers itself reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ldm.errors import PromptError, WeightsError
from ldm.tokenizer import Tokenizer, declared_pad_token, write_bundled_tokenizer

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


# --- SD-2 padding and the formats transformers writes ---------------------------------------------

SD2_PROMPTS = ["a photo of a cat", "Wow! a dog!! on the beach", "a <cat-toy> on a table", ""]


def _special(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}  # fmt: skip


@pytest.fixture(scope="module")
def sd2_folders(tmp_path_factory) -> dict[str, Path]:
    """SD-2 tokenizer folders in each format: `hub` as stabilityai/stable-diffusion-2-1 ships it
    (vocab.json + merges.txt; special_tokens_map.json pads with "!" while tokenizer_config.json
    still says EOS), `v5` as transformers 5 saves it (tokenizer.json + tokenizer_config.json),
    `json-only` with nothing but tokenizer.json, and `added` / `added-v5`: a fine-tune's extra
    token in added_tokens.json / inside tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("sd2-tokenizers")
    hub = root / "hub"
    hub.mkdir()
    for name in ("vocab.json", "merges.txt"):
        (hub / name).write_bytes((ORACLE_TOKENIZER / name).read_bytes())
    specials = {"bos_token": _special("<|startoftext|>"), "eos_token": _special("<|endoftext|>"),
                "unk_token": _special("<|endoftext|>")}  # fmt: skip
    (hub / "special_tokens_map.json").write_text(json.dumps({**specials, "pad_token": "!"}))
    (hub / "tokenizer_config.json").write_text(json.dumps(
        {**specials, "pad_token": "<|endoftext|>", "model_max_length": 77, "do_lower_case": True,
         "tokenizer_class": "CLIPTokenizer"}))  # fmt: skip
    added = root / "added"
    added.mkdir()
    for path in hub.iterdir():
        (added / path.name).write_bytes(path.read_bytes())
    (added / "added_tokens.json").write_text(json.dumps({"<cat-toy>": 49408}))
    folders = {"hub": hub, "added": added}
    for src, dst in (("hub", "v5"), ("added", "added-v5")):
        transformers.CLIPTokenizer.from_pretrained(str(folders[src])).save_pretrained(str(root / dst))
        folders[dst] = root / dst
    only = root / "json-only"
    only.mkdir()
    (only / "tokenizer.json").write_bytes((folders["v5"] / "tokenizer.json").read_bytes())
    folders["json-only"] = only
    return folders


def _transformers_ids(folder: Path, prompts: list[str]) -> list[list[int]]:
    transformers = pytest.importorskip("transformers")
    hf = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return hf(prompts, padding="max_length", max_length=77).input_ids


@pytest.mark.parametrize("fmt", ["hub", "v5", "added", "added-v5"])
def test_sd2_tokenizer_folders_pad_with_what_their_files_say_as_transformers_reads_them(sd2_folders, fmt):
    folder = sd2_folders[fmt]
    assert declared_pad_token(folder) == "!"
    ours = Tokenizer.from_dir(folder)
    assert ours.pad_id == 0 and len(ours) == (49409 if fmt.startswith("added") else 49408)
    expected = _transformers_ids(folder, SD2_PROMPTS)
    assert ours(SD2_PROMPTS).tolist() == expected
    assert expected[0][:8] == [49406, 320, 1125, 539, 320, 2368, 49407, 0]  # EOS, then "!" padding
    if fmt.startswith("added"):
        assert 49408 in expected[2]  # the fine-tune's own token, not its BPE pieces


def test_bundled_tokenizer_with_sd2_padding_equals_the_sd2_tokenizer_files(sd2_folders):
    """Single-file SD-2 checkpoints carry no tokenizer: the bundled vocabulary padded with "!"
    must tokenize exactly as SD-2's own folder does (including "!" inside a prompt)."""
    prompts = SD2_PROMPTS[:2] + SD2_PROMPTS[3:]
    assert Tokenizer.bundled("!")(prompts).tolist() == _transformers_ids(sd2_folders["hub"], prompts)


def test_a_folder_with_only_tokenizer_json_is_read_and_names_no_padding(sd2_folders):
    only = sd2_folders["json-only"]
    assert declared_pad_token(only) is None
    assert Tokenizer.from_dir(only)(SD2_PROMPTS).tolist() == _transformers_ids(only, SD2_PROMPTS)  # EOS padding
    assert Tokenizer.from_dir(only, "!")(SD2_PROMPTS).tolist() == _transformers_ids(sd2_folders["hub"], SD2_PROMPTS)


def test_sd1_folders_declare_eos_padding_and_unreadable_files_are_one_error(tmp_path):
    assert declared_pad_token(ORACLE_TOKENIZER) == "<|endoftext|>"
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(WeightsError, match="unreadable tokenizer"):
        Tokenizer.from_dir(tmp_path)
