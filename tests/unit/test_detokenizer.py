from __future__ import annotations

import pytest

from pagedllm.core.detokenizer import IncrementalDetokenizer, find_stop_string
from pagedllm.testing.checkpoints import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return build_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=300)


@pytest.mark.parametrize("text", ["naïve café — 日本語 😀 done", "def f(x):\n    return x  # ü", "😀😀😀"])
def test_incremental_text_equals_full_decode_without_broken_characters(tokenizer, text: str) -> None:
    ids = tokenizer(text).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.append(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_split_multibyte_character_is_held_back(tokenizer) -> None:
    ids = tokenizer("😀").input_ids
    assert len(ids) > 1  # the emoji's four bytes span several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.append(t) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.append(ids[-1]) == "😀"


def test_find_stop_string_earliest_in_new_text() -> None:
    assert find_stop_string("abc STOP def", ["STOP", "def"], 12) == ("STOP", 4)
    assert find_stop_string("abcST", ["STOP"], 2) is None
    assert find_stop_string("abcSTOP", ["STOP"], 2) == ("STOP", 3)  # completed by the last two chars
