"""Tag schemes. Everything inside tunelab is IOB2; other schemes are converted once, when read.

Supported input schemes: iob2 (B- starts every entity), iob1 (B- only between two adjacent entities of
one type), bioes / bilou (S-/U- single, E-/L- end), bmes (the Chinese-NER spelling of bioes: M- middle).
"""

from tunelab.errors import TunelabError

SCHEMES = ("iob2", "iob1", "bioes", "bilou", "bmes")


def _split(tag: str) -> tuple[str, str]:
    if tag == "O":
        return "O", ""
    prefix, sep, etype = tag.partition("-")
    if not sep or not etype or len(prefix) != 1:
        raise ValueError(f"tag {tag!r} is neither 'O' nor PREFIX-TYPE (e.g. B-PER)")
    return prefix, etype


def to_iob2(tags: list[str], scheme: str) -> list[str]:
    """Convert one sentence's tags from `scheme` to IOB2. Raises ValueError naming the bad tag."""
    if scheme not in SCHEMES:
        raise TunelabError(f"unknown tag scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    allowed = {"iob2": "BI", "iob1": "BI", "bioes": "BIES", "bilou": "BILU", "bmes": "BMES"}[scheme]
    out = []
    prev_type = None  # entity type of the previous token, None after O
    for tag in tags:
        prefix, etype = _split(tag)
        if prefix == "O":
            out.append("O")
            prev_type = None
            continue
        if prefix not in allowed:
            raise ValueError(f"tag {tag!r} has prefix {prefix!r}, not allowed in scheme {scheme} ({'/'.join(allowed)})")
        if scheme == "iob1":
            # IOB1: I- continues or starts an entity; B- only separates two adjacent entities of one type.
            begin = prefix == "B" or prev_type != etype
        elif scheme == "iob2":
            begin = prefix == "B"
        else:
            begin = prefix in "BSU" or prev_type != etype  # I-/E- after a closed entity starts a new one
        out.append(("B-" if begin else "I-") + etype)
        # In BIOES-like schemes an E/S/L/U tag closes the entity: the next I- would be malformed, and is
        # repaired to B- by the iob2 check below rather than silently merged.
        prev_type = None if (scheme not in ("iob1", "iob2") and prefix in "ESLU") else etype
    return repair_iob2(out)


def repair_iob2(tags: list[str]) -> list[str]:
    """An I-X that does not continue an X entity starts a new one (what seqeval's strict mode assumes is B-X)."""
    out = []
    prev = "O"
    for tag in tags:
        if tag.startswith("I-") and prev[2:] != tag[2:]:
            tag = "B-" + tag[2:]
        out.append(tag)
        prev = tag
    return out


def label_list(tag_sets) -> list[str]:
    """Sorted label list with O first, then B-/I- grouped by entity type (stable across runs)."""
    labels = set()
    for tags in tag_sets:
        labels.update(tags)
    labels.discard("O")
    return ["O"] + sorted(labels, key=lambda t: (t[2:], t[:1]))


def entity_types(labels: list[str]) -> list[str]:
    return sorted({t[2:] for t in labels if t != "O"})
