import pytest
import torch
from conftest import needs_data

from wisparse.data import load_rows, role_rows, token_windows
from wisparse.errors import WisparseError


@needs_data
def test_calibration_selection_and_evaluation_text_never_overlap(data_dir):
    calibration = role_rows("calibration", data_dir)
    selection = role_rows("selection", data_dir)
    evaluation = role_rows("evaluation", data_dir)
    assert len(calibration) > 1000 and len(selection) > 500 and len(evaluation) == 4358
    long_rows = lambda rows: {r.strip() for r in rows if len(r.strip()) > 40}  # noqa: E731
    cal, sel, ev = long_rows(calibration), long_rows(selection), long_rows(evaluation)
    assert not cal & sel and not cal & ev and not sel & ev
    test_text = "\n\n".join(evaluation)
    for paragraph in list(cal)[:300] + list(sel)[:300]:  # no train paragraph is inside the test text either
        assert paragraph[:200] not in test_text


@needs_data
def test_wikitext_test_is_the_standard_split(data_dir):
    text = "\n\n".join(load_rows("wikitext2-test", data_dir))
    assert len(text) == 1_294_336  # the size of load_dataset's rows joined, per SOURCES.md


def test_missing_data_says_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(WisparseError, match="tried: .*missing.*Hugging Face hub"):
        load_rows("wikitext2-test", tmp_path)
    with pytest.raises(WisparseError, match="unknown dataset"):
        load_rows("nope", tmp_path)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        class Out:
            input_ids = torch.tensor([[ord(c) % 128 for c in text]])

        return Out()


def test_token_windows_are_non_overlapping_and_optionally_start_with_bos():
    windows = token_windows("abcdefghij" * 3, _CharTokenizer(), 8)
    assert windows.shape == (3, 8)
    assert windows.flatten().tolist() == [ord(c) for c in ("abcdefghij" * 3)[:24]]
    with_bos = token_windows("abcdefghij" * 3, _CharTokenizer(), 8, max_windows=2, bos_token_id=1)
    assert with_bos.shape == (2, 9) and (with_bos[:, 0] == 1).all()
    with pytest.raises(WisparseError, match="shorter than one window"):
        token_windows("abc", _CharTokenizer(), 8)


@needs_data
def test_c4_documents_by_name(data_dir):
    rows = load_rows("c4", data_dir)
    assert len(rows) == 2000 and all(isinstance(r, str) and r for r in rows[:10])


def test_development_text_is_wikitext_validation_and_apart_from_test(data_dir):
    development = role_rows("development", data_dir)
    evaluation = role_rows("evaluation", data_dir)
    assert len(development) == 3760 and "Homarus gammarus" in development[1]
    long_rows = {r.strip() for r in development if len(r.strip()) > 40}
    assert long_rows and not long_rows & {r.strip() for r in evaluation}
