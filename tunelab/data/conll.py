"""CoNLL column files: one token a line, columns separated by whitespace, blank line between sentences,
`-DOCSTART-` lines between documents. The word is the first column; the tag column is chosen (default last)."""

from pathlib import Path

from tunelab.data.examples import Sentence
from tunelab.data.tags import to_iob2
from tunelab.errors import TunelabError, where


def read_conll(path, tag_column: int = -1, scheme: str = "iob2", labelled: bool = True) -> list[Sentence]:
    """Read a CoNLL file into sentences with IOB2 tags.

    `tag_column`: index of the tag column (negative counts from the end). With `labelled=False` a file of
    one word a line (or words with extra columns) is read without tags.
    """
    path = Path(path)
    if not path.is_file():
        raise TunelabError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TunelabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); convert the file to UTF-8") from None
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    start = None
    doc = 0
    ncols = None

    def close():
        nonlocal words, tags, start
        if words:
            if labelled:
                try:
                    iob2 = to_iob2(tags, scheme)
                except ValueError as e:
                    raise TunelabError(f"{where(path, start)}: sentence starting here: {e}") from None
            sentences.append(Sentence(words, iob2 if labelled else None, doc, str(path), start))
        words, tags, start = [], [], None

    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            close()
            continue
        cols = line.split()
        if cols[0] == "-DOCSTART-":
            close()
            if sentences:
                doc += 1
            continue
        if labelled:
            if len(cols) < 2:
                raise TunelabError(
                    f"{where(path, lineno)}: expected a word and a tag separated by whitespace, got {raw!r}"
                )
            if ncols is None:
                ncols = len(cols)
            elif len(cols) != ncols:
                raise TunelabError(
                    f"{where(path, lineno)}: {len(cols)} columns where earlier lines have {ncols}; "
                    "every token line needs the same columns"
                )
            try:
                tag = cols[tag_column]
            except IndexError:
                raise TunelabError(f"{where(path, lineno)}: no column {tag_column} in {raw!r}") from None
            tags.append(tag)
        if start is None:
            start = lineno
        words.append(cols[0])
    close()
    if not sentences:
        raise TunelabError(f"{path}: no sentences found (empty file?)")
    return sentences


def write_conll(path, sentences: list[Sentence], predictions: list[list[str]]) -> None:
    """Write `word gold pred` (or `word pred` when unlabelled) columns, keeping document breaks."""
    from tunelab.io import atomic_write_text

    atomic_write_text(path, conll_columns(sentences, predictions)[0])


def conll_columns(sentences: list[Sentence], predictions: list[list[str]], doc=None) -> tuple[str, int | None]:
    """The text write_conll writes, and the last sentence's document. `doc`: the document of the sentence
    written just before these (when a file is written in parts), so that a break is marked between parts too."""
    lines = []
    for sent, pred in zip(sentences, predictions):
        if sent.doc != doc and doc is not None:
            lines.append("-DOCSTART- O\n")
        doc = sent.doc
        for i, word in enumerate(sent.words):
            cols = [word] + ([sent.tags[i]] if sent.tags is not None else []) + [pred[i]]
            lines.append(" ".join(cols))
        lines.append("")
    return ("\n".join(lines) + "\n" if lines else ""), doc
