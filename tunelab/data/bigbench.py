"""Benchmark sets read out of the BIG-bench sdist on PyPI (`bigbench==1.0.0`), without installing it
(installing it pulls TensorFlow): SQuAD v1.1 dev and the SQuADShifts test sets (extractive QA), VitaminC
(fact verification: evidence/claim pairs) and an XSum subset (one-sentence summaries).

`python -m tunelab.data.bigbench` (run by scripts/setup.sh) downloads the sdist from PyPI's file host once,
checks its SHA-256, and extracts the files used here into the data cache (TUNELAB_DATA, default
~/.cache/tunelab); nothing is downloaded when a set is loaded. The files carry BIG-bench's canary: a request
to keep them out of pre-training corpora. tunelab uses them to fine-tune and evaluate only; do not put them
into `tunelab pretrain` or any other pre-training text.

Splits (none of these come split for fine-tuning here): seeded, by group, so that no article (SQuAD), page
(VitaminC) or document (XSum) is in two splits. The seeds and fractions are part of the documented benchmark.
"""

import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from tunelab.data.examples import GenExample, QAExample, TextExample
from tunelab.data.splits import SPLIT_SEED, Splits, grouped
from tunelab.errors import TunelabError

VERSION = "1.0.0"
URL = ("https://files.pythonhosted.org/packages/95/f8/c019b3579df548a04cac12342cfcb878e50ddf6cfcd7fddba8cfc721c157/"
       f"bigbench-{VERSION}.tar.gz")
SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
TASKS = f"bigbench-{VERSION}/bigbench/benchmark_tasks/"
FILES = {  # what is kept of the sdist (paths under TASKS)
    "squad_shifts/squaddev_v1.1.json", "squad_shifts/new_wiki_v1.0.json", "squad_shifts/nyt_v1.0.json",
    "squad_shifts/reddit_v1.0.json", "squad_shifts/amazon_reviews_v1.0.json",
    "vitaminc_fact_verification/task.json", "gem/xsum/task.json",
}
CANARY = "BIG-bench canary: keep out of pre-training corpora (fine-tuning and evaluation only)"


def cache_dir() -> Path:
    return Path(os.environ.get("TUNELAB_DATA", Path.home() / ".cache" / "tunelab")) / f"bigbench-{VERSION}"


def fetch(quiet: bool = False) -> Path:
    """Download (once) and extract the files in FILES; returns the folder. Safe to run again or concurrently:
    the folder appears whole (renamed into place) or not at all."""
    target = cache_dir()
    if all((target / f).is_file() for f in FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".bigbench-") as tmp:
        sdist = Path(tmp) / "sdist.tar.gz"
        if not quiet:
            print(f"downloading {URL} (358 MB, once)", file=sys.stderr)
        digest = hashlib.sha256()
        with urllib.request.urlopen(URL, timeout=120) as r, open(sdist, "wb") as f:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != SHA256:
            raise TunelabError(f"{URL}: SHA-256 {digest.hexdigest()} is not the expected {SHA256}")
        out = Path(tmp) / "files"
        with tarfile.open(sdist) as tar:
            for member in tar:
                name = member.name.removeprefix(TASKS)
                if name in FILES and member.isfile():
                    (out / name).parent.mkdir(parents=True, exist_ok=True)
                    (out / name).write_bytes(tar.extractfile(member).read())
        missing = [f for f in FILES if not (out / f).is_file()]
        if missing:
            raise TunelabError(f"{URL}: the sdist lacks {', '.join(missing)}")
        if not target.exists():
            os.replace(out, target)
    return target


def _file(name: str) -> Path:
    path = cache_dir() / name
    if not path.is_file():
        raise TunelabError(f"the BIG-bench data files are not set up ({path} is missing); run: python -m "
                           "tunelab.data.bigbench (scripts/setup.sh does)")
    return path


def _align(context: str, start: int, text: str) -> tuple[int, str] | None:
    """An answer as it sits in the context. A few SQuAD-format answers are off: a leading space in the text
    (SQuAD v1.1 dev: 15 of 34,680) or an offset one character out (Amazon reviews: 947 of 27,198). The text
    without outer white space, at its occurrence nearest the given offset; None if it is not in the context."""
    text = text.strip()
    if context[start:start + len(text)] == text:
        return start, text
    found = [m.start() for m in re.finditer(re.escape(text), context)]
    return (min(found, key=lambda k: abs(k - start)), text) if found else None


def _squad_file(name: str) -> tuple[dict[str, list[QAExample]], int]:
    """A SQuAD-format JSON file as its questions, grouped by article title, and how many answers were moved
    to where their text is (_align)."""
    path = _file(f"squad_shifts/{name}")
    doc = json.loads(path.read_text(encoding="utf-8"))
    groups, moved = {}, 0
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = []
                for a in qa["answers"]:
                    at = _align(context, a["answer_start"], a["text"])
                    if at is None:
                        raise TunelabError(f"{path}: question {qa['id']}: answer {a['text']!r} is not in its context")
                    moved += at != (a["answer_start"], a["text"])
                    answers.append(at)
                groups.setdefault(article["title"], []).append(
                    QAExample(qa["question"], context, answers, qa["id"], str(path)))
    return groups, moved


def squad():
    """SQuAD v1.1 dev (the 10,565 questions BIG-bench keeps), split by article 70/10/20 (seed 13). There is
    no SQuAD training set offline: models train on part of dev here, so scores are not comparable with
    SQuAD leaderboard numbers (trained on 87,599 training questions)."""
    groups, moved = _squad_file("squaddev_v1.1.json")
    train, dev, test = grouped(groups, (0.7, 0.1, 0.2), SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "squad", "files": str(cache_dir() / "squad_shifts"), "note": CANARY, "answers_realigned": moved,
        "split": f"SQuAD v1.1 dev ({sum(map(len, groups.values())):,} questions, {len(groups)} articles), split "
                 f"by article 70/10/20, seed {SPLIT_SEED}"})


SHIFTS = {"squad_shifts_wiki": "new_wiki_v1.0.json", "squad_shifts_nyt": "nyt_v1.0.json",
          "squad_shifts_reddit": "reddit_v1.0.json", "squad_shifts_amazon": "amazon_reviews_v1.0.json"}


def squad_shift(name: str):
    """One SQuADShifts domain (Miller et al. 2020: new Wikipedia, New York Times, Reddit, Amazon reviews),
    a test set only: for a model trained on SQuAD (`tunelab eval MODEL --data squad_shifts_nyt`)."""
    groups, moved = _squad_file(SHIFTS[name])
    return Splits([], [], [q for g in groups.values() for q in g], {
        "name": name, "files": str(cache_dir() / "squad_shifts" / SHIFTS[name]), "note": CANARY,
        "answers_realigned": moved,
        "split": "test only (the whole domain)"})


VITAMINC_LABELS = {"True": "SUPPORTS", "False": "REFUTES", "Neither": "NOT ENOUGH INFO"}


def vitaminc():
    """VitaminC (Schuster et al. 2021), the 54,668 real-revision evidence/claim pairs BIG-bench ships: the
    evidence sentence (with its Wikipedia page title) as the text, the claim as the text pair; SUPPORTS /
    REFUTES / NOT ENOUGH INFO. Split by page 80/10/10 (seed 13): contrastive pairs of one page stay together."""
    path = _file("vitaminc_fact_verification/task.json")
    examples = json.loads(path.read_text(encoding="utf-8"))["examples"]
    groups, seen = {}, set()
    for n, ex in enumerate(examples):
        evidence, sep, claim = ex["input"].rpartition("\nClaim: ")
        label = [k for k, v in ex["target_scores"].items() if v == 1]
        if not sep or len(label) != 1:
            raise TunelabError(f"{path}: example {n} is not 'PAGE: EVIDENCE\\nClaim: CLAIM' with one label")
        key = (evidence, claim)
        if key in seen:
            continue
        seen.add(key)
        page = evidence.split(": ", 1)[0]
        groups.setdefault(page, []).append(TextExample(" ".join(evidence.split()), VITAMINC_LABELS[label[0]],
                                                       str(path), n, text_pair=" ".join(claim.split())))
    train, dev, test = grouped(groups, (0.8, 0.1, 0.1), SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "vitaminc", "files": str(path), "note": CANARY, "task": "evidence, claim -> SUPPORTS / REFUTES / "
        "NOT ENOUGH INFO", "split": f"{len(seen):,} unique pairs, {len(groups):,} pages, split by page 80/10/10, "
                                    f"seed {SPLIT_SEED}", "text_pair_field": "text_pair"})


XSUM_PROMPT_WORDS = 200


def xsum():
    """The 1,001 XSum test documents BIG-bench's GEM task ships (Narayan et al. 2018): the document's first
    XSUM_PROMPT_WORDS words -> its one-sentence summary; split 80/10/10 (seed 13)."""
    path = _file("gem/xsum/task.json")
    groups = {}
    for n, ex in enumerate(json.loads(path.read_text(encoding="utf-8"))["examples"]):
        words = re.sub(r"\s+", " ", ex["input"]).split(" ")
        prompt = "Summarize in one sentence: " + " ".join(words[:XSUM_PROMPT_WORDS])
        groups[ex.get("comment", str(n))] = [GenExample(prompt, " ".join(ex["target"].split()), str(path), n)]
    train, dev, test = grouped(groups, (0.8, 0.1, 0.1), SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "xsum", "files": str(path), "note": CANARY,
        "task": f"document (first {XSUM_PROMPT_WORDS} words) -> one-sentence summary",
        "split": f"the {len(groups):,} documents BIG-bench keeps of the XSum test set, 80/10/10, seed {SPLIT_SEED}"})


if __name__ == "__main__":
    print(fetch())
