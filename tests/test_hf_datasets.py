"""A Hugging Face `datasets.Dataset` as training data: ClassLabel columns become label names."""

import pytest

from tunelab.data import Sentence, TextExample, from_hf_dataset
from tunelab.errors import TunelabError

datasets = pytest.importorskip("datasets")


def test_token_classification_dataset_with_classlabel_tags():
    names = ["O", "B-PER", "I-PER", "B-LOC"]
    feats = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                               "ner_tags": datasets.Sequence(datasets.ClassLabel(names=names))})
    ds = datasets.Dataset.from_dict({"tokens": [["Ann", "Lee", "left"], ["Paris"]],
                                     "ner_tags": [[1, 2, 0], [3]]}, features=feats)
    out = from_hf_dataset(ds, "ner")
    assert all(isinstance(s, Sentence) for s in out)
    assert out[0].words == ["Ann", "Lee", "left"] and out[0].tags == ["B-PER", "I-PER", "O"]
    assert out[1].tags == ["B-LOC"]


def test_classification_dataset_with_classlabel_and_missing_column():
    feats = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["awful", "lovely"], "label": [0, 1]}, features=feats)
    out = from_hf_dataset(ds, "classify")
    assert [(e.text, e.label) for e in out] == [("awful", "neg"), ("lovely", "pos")]
    assert all(isinstance(e, TextExample) for e in out)
    with pytest.raises(TunelabError, match="sentence"):
        from_hf_dataset(ds, "classify", text_field="sentence")
