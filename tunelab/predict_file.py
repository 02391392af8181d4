"""`tunelab predict` on a file of any size: inputs streamed in chunks through `Predictor`, records written as
each chunk is done, to a temporary file that replaces the output only when every chunk succeeded.

Two passes over the input: a quick check of every line (no model), which counts the examples for the
progress bar and finds the bad lines, so that `on_error="fail"` stops before any prediction or output; then
the predictions, `chunk_size` examples at a time. Memory holds one chunk, whatever the file's size (a CoNLL
input of a model that reads neighbouring sentences as context is cut only between documents, so a chunk
holds whole documents).
"""

import contextlib
import json
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from tunelab import progress
from tunelab.data.examples import Sentence, TextExample
from tunelab.data.stream import BadLine
from tunelab.errors import TunelabError

SHOWN = 20  # bad lines printed one by one; the rest are counted


@dataclass
class Summary:
    examples: int = 0
    bad: list[BadLine] = field(default_factory=list)  # the first SHOWN
    bad_count: int = 0


def chunks(items: Iterable, size: int, group: Callable | None = None) -> Iterator[list]:
    """Lists of about `size` items, in order. With `group`, a list is only cut where group(item) changes,
    so that items of one group (a document) stay together."""
    chunk = []
    for item in items:
        if len(chunk) >= size and (group is None or group(item) != group(chunk[-1])):
            yield chunk
            chunk = []
        chunk.append(item)
    if chunk:
        yield chunk


def scan(items: Iterable) -> Summary:
    s = Summary()
    for item in items:
        if isinstance(item, BadLine):
            s.bad_count += 1
            if len(s.bad) < SHOWN:
                s.bad.append(item)
        else:
            s.examples += 1
    return s


def predict_file(predictor, open_inputs: Callable[[], Iterable], output: str | None, *, task: str | None = None,
                 on_error: str = "fail", chunk_size: int = 1000, max_new_tokens: int | None = None,
                 warn=None, source: str | None = None) -> Summary:
    """Predict every input of `open_inputs()` (a fresh iterator of examples, raw TextExamples and BadLines on
    each call) and write one record per example to `output` (JSONL; CoNLL columns for NER when it ends in
    .conll), or to standard output when it is None. `warn(message)` reports bad lines (default: stderr).

    on_error="fail": any bad line raises TunelabError before anything is predicted or written.
    on_error="skip": bad lines are reported and left out. `source`: the input's name, for messages."""
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be fail or skip, not {on_error!r}")
    if chunk_size < 1:
        raise TunelabError("--chunk-size must be at least 1")
    warn = warn or (lambda message: print(f"tunelab: warning: {message}", file=sys.stderr))
    info = predictor.task_meta(task)
    t = predictor.task_for(task=task)
    if max_new_tokens is not None:
        bound = t.new_tokens_bound
        if bound is None:
            raise TunelabError(f"--max-new-tokens is for generation; this model's task is {t.kind}")
        if not 1 <= max_new_tokens <= bound:
            raise TunelabError(f"--max-new-tokens {max_new_tokens}: must be between 1 and the model's "
                               f"max_target_length ({bound})")

    summary = scan(open_inputs())
    if summary.bad_count:
        for bad in summary.bad:
            warn(str(bad))
        more = summary.bad_count - len(summary.bad)
        if more:
            warn(f"... and {more} more bad line(s)")
        if on_error == "fail":
            raise TunelabError(f"{summary.bad[0].source}: {summary.bad_count} bad line(s), the first at line "
                               f"{summary.bad[0].line}; nothing was written (fix them, or pass --on-error skip "
                               "to leave them out)")
    if not summary.examples:
        raise TunelabError((f"{source}: " if source else "") + "no examples to predict" +
                           (" (every line is bad)" if summary.bad_count else " (empty input?)"))

    conll = output is not None and str(output).endswith(".conll") and "conll" in t.outputs
    # A model that reads neighbouring sentences gets the same neighbours as in one call: cut between documents.
    group = _document if info.get("context_sentences", 0) else None
    good = (item for item in open_inputs() if not isinstance(item, BadLine))
    bar = progress.bar(total=summary.examples, desc="predict", unit="example", disable=summary.examples <= 64)
    with bar, _output(output) as out:
        doc = None
        for k, chunk in enumerate(chunks(good, chunk_size, group)):
            if isinstance(chunk[0], TextExample):  # raw text (prompts, texts to classify, text to split)
                examples, offsets = t.text_examples(chunk)
            else:
                examples, offsets = chunk, None
            unreadable = predictor.unreadable(examples, task=task) if k == 0 else None  # the first chunk tells
            if unreadable:
                warn((f"{source}: " if source else "") + unreadable)
            predictions = predictor.predict(examples, task=task, max_new_tokens=max_new_tokens)
            if conll:
                text, doc = t.conll(examples, predictions, doc)
                out.write(text)
            else:
                out.write("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                  for r in t.records(t.labels, examples, predictions, offsets)))
            bar.update(len(chunk))
    if summary.bad_count:
        where = summary.bad[0].source
        warn(f"{where}: skipped {summary.bad_count} bad line(s) (--on-error skip); predicted {summary.examples}")
    return summary


def _document(item):
    """What must not be split between chunks: a CoNLL document's sentences; raw texts are each their own."""
    return (item.source, item.doc) if isinstance(item, Sentence) else object()


@contextlib.contextmanager
def _output(path):
    if path is None:
        yield sys.stdout
        sys.stdout.flush()
        return
    from tunelab.io import atomic_open

    with atomic_open(path) as f:
        yield f
