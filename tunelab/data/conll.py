"""CoNLL column files: one token a line, columns separated by whitespace, blank line between sentences,
`-DOCSTART-` lines between documents. The word is the first column; the tag column is chosen (default last)."""

from tunelab.data.examples import Sentence
from tunelab.data.readers import collect, conll_sentences


def read_conll(path, tag_column: int = -1, scheme: str = "iob2", labelled: bool = True, note_iob1: bool = True
               ) -> list[Sentence]:
    """Read a CoNLL file into sentences with IOB2 tags, at once (the first bad line is a TunelabError).

    `tag_column`: index of the tag column (negative counts from the end). With `labelled=False` a file of
    one word a line (or words with extra columns) is read without tags. `note_iob1=False`: no warning about
    IOB1-looking tags read as IOB2 (for packaged sets).
    """
    return collect(conll_sentences(path, tag_column if labelled else None, scheme, note_iob1), path, "sentences")


def write_conll(path, sentences: list[Sentence], predictions: list[list[str]]) -> None:
    """Write `word gold pred` (or `word pred` when unlabelled) columns, keeping document breaks."""
    from tunelab.io import atomic_write_text

    atomic_write_text(path, conll_columns(sentences, predictions)[0])


def conll_columns(sentences: list[Sentence], predictions: list[list[str]], doc=None) -> tuple[str, int | None]:
    """The text write_conll writes, and the last sentence's document. `doc`: the document of the sentence
    written just before these (when a file is written in parts), so that a break is marked between parts too.
    A document break is a -DOCSTART- line with as many columns as the token lines (`-DOCSTART- O O`, or
    `-DOCSTART- O` without gold tags): the conlleval script stops at a line with another number of columns."""
    lines = []
    for sent, pred in zip(sentences, predictions):
        if sent.doc != doc and doc is not None:
            lines.append("-DOCSTART-" + " O" * (2 if sent.tags is not None else 1) + "\n")
        doc = sent.doc
        for i, word in enumerate(sent.words):
            cols = [word] + ([sent.tags[i]] if sent.tags is not None else []) + [pred[i]]
            lines.append(" ".join(cols))
        lines.append("")
    return ("\n".join(lines) + "\n" if lines else ""), doc
