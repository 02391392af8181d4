"""Vocabulary trimming (model.trim_vocab): keep only the embedding rows of the pieces a task's data uses.

A multilingual encoder spends most of its parameters on its vocabulary (multilingual-e5-small: 96M of 118M on
250k pieces), and one language's data touches a few percent of them. The optimizer still keeps two moments for
every row, and the saved folder carries them all. Trimming keeps the special tokens, every piece the training
(and dev) data tokenises into, and a reserve of the tokenizer's most probable other pieces, so that unseen text
still splits into known pieces rather than <unk>; the embedding matrix and the tokenizer are cut to those
pieces together, with ids renumbered in their old order.

For a SentencePiece Unigram tokenizer the cut is exact on the kept text: the best segmentation of a text that
uses only kept pieces stays the best once the others are gone (every segmentation left was there before), so
in-vocabulary text gets the same pieces and the model the same logits. Other text is segmented into the pieces
that remain. WordPiece vocabularies (BERT) are cut likewise; BPE tokenizers, whose merges name their pieces,
are refused, as are models whose output layer is tied to the vocabulary (a language model's head).
"""

import json
from pathlib import Path

from tunelab.errors import TunelabError


def used_ids(features: list[dict]) -> set[int]:
    return {t for f in features for t in f["input_ids"]}


def keep_ids(tokenizer, used: set[int], reserve: int) -> list[int]:
    """The old ids to keep, ascending: special tokens, the used ids, and up to `reserve` others, most probable
    first (Unigram scores; WordPiece lists pieces roughly by frequency, so its first ids)."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    keep = set(used) | set(tokenizer.all_special_ids) | {a["id"] for a in spec.get("added_tokens", [])}
    if model["type"] == "Unigram":
        ranked = sorted(range(len(model["vocab"])), key=lambda i: -model["vocab"][i][1])
    elif model["type"] == "WordPiece":
        ranked = sorted(model["vocab"].values())
    else:
        raise TunelabError(f"model.trim_vocab: a {model['type']} tokenizer cannot be trimmed (its merges name the "
                           "pieces they build); trimming works for SentencePiece Unigram (XLM-R, e5) and WordPiece "
                           "(BERT) vocabularies")
    extra = [i for i in ranked if i not in keep][:reserve]
    return sorted(keep | set(extra))


def trimmed_tokenizer(tokenizer, keep: list[int]):
    """The tokenizer with only the `keep` pieces, renumbered 0.. in their old order."""
    import tempfile

    from tunelab.models.files import load_tokenizer

    new_id = {old: new for new, old in enumerate(keep)}
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][i] for i in keep]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        model["vocab"] = {piece: new_id[i] for piece, i in model["vocab"].items() if i in new_id}
    for added in spec.get("added_tokens", []):
        added["id"] = new_id[added["id"]]
    _renumber_specials(spec.get("post_processor"), new_id)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        with open(f"{tmp}/tokenizer.json", "w", encoding="utf-8") as f:
            json.dump(spec, f, ensure_ascii=False)
        for name in ("sentencepiece.bpe.model", "spiece.model", "vocab.txt"):  # (the old vocabulary, if any)
            Path(tmp, name).unlink(missing_ok=True)
        return load_tokenizer(tmp)


def _renumber_specials(processor, new_id: dict) -> None:
    """The ids a post-processor adds ([CLS]/[SEP], <s>/</s>), wherever it keeps them."""
    if not processor:
        return
    for p in processor.get("processors", []):
        _renumber_specials(p, new_id)
    for entry in (processor.get("special_tokens") or {}).values():
        entry["ids"] = [new_id[i] for i in entry["ids"]]
    for key in ("cls", "sep"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(processor.get(key), list):
            processor[key][1] = new_id[processor[key][1]]


def trim_model(model, tokenizer, keep: list[int]) -> None:
    """Cut the model's input embeddings to the `keep` rows (in place) and renumber its config's token ids."""
    import torch

    from tunelab.peft import base_of

    base = base_of(model)
    if base.get_output_embeddings() is not None:
        raise TunelabError("model.trim_vocab: this model predicts tokens (a language-model head over the "
                           "vocabulary); trimming is for token and sequence classifiers")
    old = base.get_input_embeddings()
    rows = torch.tensor(keep, dtype=torch.long, device=old.weight.device)
    new = torch.nn.Embedding(len(keep), old.embedding_dim, padding_idx=tokenizer.pad_token_id,
                             device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight.index_select(0, rows))
    base.set_input_embeddings(new)
    config = base.config
    config.vocab_size = len(keep)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        special = getattr(tokenizer, key.replace("_id", ""), None)
        if getattr(config, key, None) is not None:
            setattr(config, key, tokenizer.convert_tokens_to_ids(special) if special is not None else None)


def trim_vocab(model, tokenizer, features: list[dict], reserve: int):
    """(the trimmed tokenizer, what was kept) for a model whose embeddings are cut in place. `features`: the
    data encoded with the full tokenizer (training and dev)."""
    used = used_ids(features)
    keep = keep_ids(tokenizer, used, reserve)
    new_tokenizer = trimmed_tokenizer(tokenizer, keep)
    trim_model(model, new_tokenizer, keep)
    return new_tokenizer, {"pieces_before": len(tokenizer), "pieces_after": len(keep), "used": len(used),
                           "reserve": reserve}
