"""Data augmentation as plain functions over examples (TextExample texts, NER Sentences), seeded per example.

An operation is `op(example, rng, intensity) -> example` (a new example; the input is never mutated). Ops that
need data take it as a keyword, bound with functools.partial: `partial(neighbour_replace, neighbours=nb)`.
`augment(example, ops, rng)` applies a list of `(op, p, intensity)`: each op with probability p, in order.

Every random choice comes from `rng_for(seed, epoch, index)`, so the same (seed, epoch) gives the same data in
any process, and a resumed run sees the data it would have seen. `epoch_augmenter` plugs this into a recipe's
per-epoch data seam (`train(cfg, epoch_data=...)`).

Sentence ops keep `len(words) == len(tags)` and valid IOB2, and never change a mention's words unless that is
their point (mention_replace): word deletion/insertion touch only O words, word swap shuffles inside runs of O
tokens only (shuffling inside a mention or across its border would change or break the entity), and
neighbour replacement only replaces O words (a neighbour of "Paris" need not be a location).

Chinese (any CJK character): word-level ops on texts see one character per word and join without spaces;
character noise only deletes or transposes CJK characters (an ASCII typo inside a Chinese word is not a
realistic error).
"""

import hashlib
import random
import re
from dataclasses import replace

from tunelab.data.examples import MultiLabelText, ScoredText, Sentence, TextExample

# QWERTY neighbours of each lower-case key (same row and the rows above/below): realistic slips of a finger.
_ROWS = ("1234567890", "qwertyuiop", "asdfghjkl", "zxcvbnm")
QWERTY_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _ch in enumerate(_row):
        QWERTY_NEIGHBOURS[_ch] = "".join(
            _ROWS[r][c] for r in (_r - 1, _r, _r + 1) if 0 <= r < len(_ROWS)
            for c in (_c - 1, _c, _c + 1) if 0 <= c < len(_ROWS[r]) and (r, c) != (_r, _c))

_CJK_CHARS = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff"  # CJK ideographs, incl. extensions
_CJK = re.compile(f"[{_CJK_CHARS}]")
_TOKEN = re.compile(f"[{_CJK_CHARS}]|[^\\s{_CJK_CHARS}]+")  # one CJK character, or a run of other non-space
NOISE_KINDS = ("typo", "keyboard", "case")


def rng_for(seed: int, epoch: int, index: int) -> random.Random:
    """The generator for example `index` of epoch `epoch`. blake2b, not hash(): str hashing is salted per
    process, and the data must be the same in every process and after a resume."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def has_cjk(text: str) -> bool:
    return _CJK.search(text) is not None


def split_text(text: str) -> list[str]:
    """Words of a text for word-level ops: whitespace-separated, and each CJK character a word of its own."""
    return _TOKEN.findall(text)


def join_words(words: list[str]) -> str:
    """Inverse of split_text up to whitespace: a space only between two non-CJK words (none around Chinese)."""
    out = ""
    for w in words:
        if w and out and not has_cjk(out[-1]) and not has_cjk(w[0]):
            out += " "
        out += w
    return out


# ---- character noise ------------------------------------------------------------------------------------------

def noise_word(word: str, rng: random.Random, intensity: float, kinds=NOISE_KINDS, allow_empty=False) -> str:
    """One word with character noise. A non-CJK word gets one edit with probability `intensity` (a typo:
    delete/insert/substitute/transpose; a keyboard-neighbour substitution; or a case flip). In a word with CJK
    characters each CJK character is deleted or transposed with the next one with probability `intensity`, and
    nothing else changes. Without `allow_empty` a word never becomes empty (NER words must stay words)."""
    if has_cjk(word):
        chars, i = list(word), 0
        while i < len(chars):
            if has_cjk(chars[i]) and rng.random() < intensity:
                if i + 1 < len(chars) and has_cjk(chars[i + 1]) and rng.random() < 0.5:
                    chars[i], chars[i + 1] = chars[i + 1], chars[i]
                    i += 1  # a transposed pair is not edited again
                elif len(chars) > 1 or allow_empty:
                    del chars[i]
                    continue
            i += 1
        return "".join(chars)
    if not word or rng.random() >= intensity:
        return word
    kind = rng.choice(kinds)
    if kind == "case":
        return word.lower() if any(c.isupper() for c in word) else word.capitalize()
    if kind == "keyboard":
        spots = [i for i, c in enumerate(word) if c.lower() in QWERTY_NEIGHBOURS]
        if not spots:
            return word
        i = rng.choice(spots)
        new = rng.choice(QWERTY_NEIGHBOURS[word[i].lower()])
        return word[:i] + (new.upper() if word[i].isupper() else new) + word[i + 1:]
    edits = ["insert", "substitute"] + (["delete"] if len(word) > 1 or allow_empty else []) + \
        (["transpose"] if len(word) > 1 else [])
    edit, i = rng.choice(edits), rng.randrange(len(word))
    letter = rng.choice("abcdefghijklmnopqrstuvwxyz")
    if edit == "delete":
        return word[:i] + word[i + 1:]
    if edit == "insert":
        return word[:i] + letter + word[i:]
    if edit == "substitute":
        return word[:i] + letter + word[i + 1:]
    i = min(i, len(word) - 2)
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]


def char_noise(example, rng: random.Random, intensity: float, kinds=NOISE_KINDS):
    """Character noise on every word (see noise_word). A text keeps its whitespace; a Sentence its tags."""
    if isinstance(example, Sentence):
        return replace(example, words=[noise_word(w, rng, intensity, kinds) for w in example.words],
                       tags=_copy(example.tags))
    parts = re.split(r"(\s+)", example.text)  # odd positions: the whitespace, kept as it was
    return replace(example, text="".join(p if k % 2 else noise_word(p, rng, intensity, kinds, allow_empty=True)
                                         for k, p in enumerate(parts)))


def case_flip(example, rng: random.Random, intensity: float):
    """Case flips only (lower <-> capitalized), each word with probability `intensity`."""
    return char_noise(example, rng, intensity, kinds=("case",))


# ---- word-level ops -------------------------------------------------------------------------------------------

def _copy(tags):
    return None if tags is None else list(tags)


def _on_text(example: TextExample, fn) -> TextExample:
    words = split_text(example.text)
    return replace(example, text=join_words(fn(words))) if words else example


def _o_runs(tags: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of O tags."""
    runs, start = [], None
    for i, t in enumerate(tags + ["B-END"]):
        if t == "O" and start is None:
            start = i
        elif t != "O" and start is not None:
            runs.append((start, i))
            start = None
    return runs


def word_swap(example, rng: random.Random, intensity: float):
    """Texts: max(1, round(intensity * n)) swaps of two random words. Sentences: each run of O tokens is
    shuffled with probability `intensity` (mentions and their positions stay as they are)."""
    if isinstance(example, Sentence):
        words = list(example.words)
        for s, e in _o_runs(example.tags or ["O"] * len(words)):
            if e - s > 1 and rng.random() < intensity:
                run = words[s:e]
                rng.shuffle(run)
                words[s:e] = run
        return replace(example, words=words, tags=_copy(example.tags))

    def swap(words):
        words = list(words)
        for _ in range(max(1, round(intensity * len(words))) if len(words) > 1 else 0):
            i, j = rng.randrange(len(words)), rng.randrange(len(words))
            words[i], words[j] = words[j], words[i]
        return words
    return _on_text(example, swap)


shuffle_o_runs = word_swap  # the Sentence behaviour under its descriptive name


def word_delete(example, rng: random.Random, intensity: float):
    """Each word (Sentences: each O word) is deleted with probability `intensity`; at least one word stays.
    Deleting an O word keeps IOB2 valid: in valid IOB2 an O is never followed by I-."""
    if isinstance(example, Sentence):
        tags = example.tags or ["O"] * len(example.words)
        keep = [i for i, t in enumerate(tags) if t != "O" or rng.random() >= intensity]
        if not keep and tags:  # only O words could go, so every word was O: keep one of them
            keep = [rng.randrange(len(tags))]
        return replace(example, words=[example.words[i] for i in keep],
                       tags=None if example.tags is None else [tags[i] for i in keep])

    def delete(words):
        kept = [w for w in words if rng.random() >= intensity]
        return kept or [rng.choice(words)]
    return _on_text(example, delete)


def word_insert(example, rng: random.Random, intensity: float):
    """max(1, round(intensity * n)) insertions of a copy of a word of the same example at a random place.
    Sentences: copies of O words only, tagged O, never inserted before an I- tag (that would split a mention)."""
    if isinstance(example, Sentence):
        words, tags = list(example.words), list(example.tags or ["O"] * len(example.words))
        pool = [w for w, t in zip(words, tags) if t == "O"]
        for _ in range(max(1, round(intensity * len(words))) if pool else 0):
            spots = [i for i in range(len(words) + 1) if i == len(words) or not tags[i].startswith("I-")]
            i = rng.choice(spots)
            words.insert(i, rng.choice(pool))
            tags.insert(i, "O")
        return replace(example, words=words, tags=None if example.tags is None else tags)

    def insert(words):
        words = list(words)
        for _ in range(max(1, round(intensity * len(words)))):
            words.insert(rng.randrange(len(words) + 1), rng.choice(words))
        return words
    return _on_text(example, insert)


# ---- nearest neighbours in the model's embedding space --------------------------------------------------------

def embedding_neighbours(embeddings, tokenizer, k: int = 5, chunk: int = 2048) -> dict[str, list[str]]:
    """For each single-piece vocabulary word, its k nearest other words by cosine of input embeddings.

    embeddings: (vocab, hidden) tensor (e.g. model.get_input_embeddings().weight); tokenizer: its tokenizer
    (get_vocab() and all_special_tokens). Candidates are tokens that are not special, not [bracketed]
    placeholders ([unused12]), not WordPiece continuations ('##ing') and hold a letter or digit. Returns
    word -> k neighbour words, nearest first. Cost: a (n, hidden) x (hidden, n) product in (chunk, n) blocks,
    so memory stays at chunk * n floats (MiniLM's 30k vocabulary: a few seconds on CPU)."""
    import torch

    special = set(tokenizer.all_special_tokens)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    words = [(w, i) for w, i in vocab if w not in special and not w.startswith("##") and
             not (w.startswith("[") and w.endswith("]")) and any(c.isalnum() for c in w) and i < len(embeddings)]
    if len(words) < 2:
        return {}
    k = min(k, len(words) - 1)
    with torch.no_grad():
        e = embeddings.detach()[torch.tensor([i for _, i in words])].float()
        e = torch.nn.functional.normalize(e, dim=1)
        out = {}
        for s in range(0, len(words), chunk):
            sims = e[s:s + chunk] @ e.T  # (chunk, n) cosines
            rows = torch.arange(sims.shape[0])
            sims[rows, rows + s] = float("-inf")  # a word is not its own neighbour
            top = sims.topk(k, dim=1).indices.tolist()
            for r, idx in enumerate(top):
                out[words[s + r][0]] = [words[j][0] for j in idx]
    return out


def _neighbour(word: str, rng: random.Random, neighbours: dict) -> str:
    cands = neighbours.get(word) or neighbours.get(word.lower())
    if not cands:
        return word
    new = rng.choice(cands)
    return new.capitalize() if word[:1].isupper() and word not in neighbours else new  # keep a capital


def neighbour_replace(example, rng: random.Random, intensity: float, neighbours: dict[str, list[str]]):
    """Each word that is one vocabulary piece (a key of `neighbours`, from embedding_neighbours; also tried
    lower-cased) is replaced by a random one of its neighbours with probability `intensity`. Sentences:
    O words only, tags unchanged."""
    if isinstance(example, Sentence):
        tags = example.tags or ["O"] * len(example.words)
        return replace(example, tags=_copy(example.tags), words=[
            _neighbour(w, rng, neighbours) if t == "O" and rng.random() < intensity else w
            for w, t in zip(example.words, tags)])
    return _on_text(example, lambda words: [_neighbour(w, rng, neighbours) if rng.random() < intensity else w
                                            for w in words])


# ---- NER mentions ---------------------------------------------------------------------------------------------

def mentions(tags: list[str]) -> list[tuple[int, int, str]]:
    """(start, end, type) of each IOB2 mention, end exclusive. A stray I- (invalid IOB2) starts a mention."""
    out = []
    for i, t in enumerate(tags):
        if t == "O":
            continue
        prefix, etype = t.split("-", 1)
        if prefix == "B" or not out or out[-1][1] != i or out[-1][2] != etype:
            out.append((i, i + 1, etype))
        else:
            out[-1] = (out[-1][0], i + 1, etype)
    return out


def mention_pool(sentences: list[Sentence]) -> dict[str, list[tuple[str, ...]]]:
    """Entity type -> the distinct mentions (word tuples) of that type in `sentences`, in first-seen order
    (a stable order: the same pool, hence the same draws, in every process)."""
    pool: dict[str, dict[tuple[str, ...], None]] = {}
    for s in sentences:
        for start, end, etype in mentions(s.tags or []):
            pool.setdefault(etype, {})[tuple(s.words[start:end])] = None
    return {t: list(m) for t, m in pool.items()}


def mention_replace(sentence: Sentence, rng: random.Random, intensity: float,
                    pool: dict[str, list[tuple[str, ...]]]) -> Sentence:
    """Each mention is replaced with probability `intensity` by a random mention of the same type from `pool`
    (mention_pool of the training set), tagged B-TYPE I-TYPE ... for its own length. Texts are returned as
    they are (they have no mentions)."""
    if not isinstance(sentence, Sentence) or not sentence.tags:
        return sentence
    words, tags, last = [], [], 0
    for start, end, etype in mentions(sentence.tags):
        words += sentence.words[last:start]
        tags += sentence.tags[last:start]
        new = tuple(sentence.words[start:end])
        if rng.random() < intensity and pool.get(etype):
            new = rng.choice(pool[etype])
        words += new
        tags += [f"B-{etype}"] + [f"I-{etype}"] * (len(new) - 1)
        last = end
    return replace(sentence, words=words + sentence.words[last:], tags=tags + sentence.tags[last:])


# ---- applying ops, and the per-epoch seam ---------------------------------------------------------------------

def augment(example, ops, rng: random.Random):
    """Apply ops = [(op, p, intensity), ...] in order, each with probability p (one rng.random() per op)."""
    if not isinstance(example, (Sentence, TextExample, ScoredText, MultiLabelText)):
        from tunelab.errors import TunelabError

        raise TunelabError(f"data augmentation rewrites the words of texts and NER sentences; {type(example).__name__} "
                           "examples (extractive QA, relation extraction) hold character offsets into their text "
                           "that it would break: leave robust.augment and --perturb unset for them")
    for op, p, intensity in ops:
        if rng.random() < p:
            example = op(example, rng, intensity)
    return example


def augment_all(examples: list, ops, seed: int, epoch: int) -> list:
    """Every example augmented with its own generator rng_for(seed, epoch, index)."""
    return [augment(ex, ops, rng_for(seed, epoch, i)) for i, ex in enumerate(examples)]


def _counts(features, n: int) -> list[int]:
    """Features per example, from each feature's "example" index (every tunelab task sets it)."""
    counts = [0] * n
    for f in features:
        counts[f["example"]] += 1
    return counts


def epoch_augmenter(examples: list, encode, ops, seed: int | None = None, same_count: bool = False):
    """f(seed, epoch) -> features of that epoch's augmented examples, for train(cfg, epoch_data=f).

    encode(examples) -> features: the task's encoding, e.g. `lambda xs: task.encode(xs, training=True)`.
    Every epoch is augmented, epoch 0 included (each op fires with its probability p per example). `seed`, when
    given, replaces the seed the recipe passes, so the augmented data can stay fixed across model seeds.
    f is a pure function of (seed, epoch): `examples` is never mutated.

    The number of features can change (NER windows long sentences; insertions make them longer): the supervised
    recipe allows that. The multi-task recipe needs every epoch to have as many features as the original
    encoding: with same_count=True an augmented example whose encoding yields another number of features than
    the original's is replaced by the original (a window count depends only on the sentence itself)."""
    examples = list(examples)
    base = _counts(encode(examples), len(examples)) if same_count else None

    def f(run_seed: int, epoch: int):
        batch = augment_all(examples, ops, run_seed if seed is None else seed, epoch)
        feats = encode(batch)
        if base is not None:
            changed = [i for i, c in enumerate(_counts(feats, len(batch))) if c != base[i]]
            if changed:
                for i in changed:
                    batch[i] = examples[i]
                feats = encode(batch)
        return feats
    return f


# The operations the `robust.augment` config section names (tunelab.config.AUGMENTATIONS lists the same names).
# neighbours and mentions need data: embedding_neighbours(...) / mention_pool(...), bound with partial.
OPS = {"char_noise": char_noise, "case": case_flip, "swap": word_swap, "delete": word_delete,
       "insert": word_insert, "neighbours": neighbour_replace, "mentions": mention_replace}
