"""The server refuses control characters in texts (issue 14): 422 naming texts[i], the same characters the file
readers refuse (tunelab.data.readers.CONTROL)."""

import re
from types import SimpleNamespace

import pytest

from tunelab.serve.api import ApiError, Limits, parse_predict, request_schema
from tunelab.serve.model import Route


class OneTask:
    """The little of a ModelService that request checks look at: one NER task."""

    multitask = False
    adapters: dict = {}  # noqa: RUF012 (read only)

    def __init__(self):
        self.tasks = {"ner": SimpleNamespace(kind="ner", labels=["O", "B-PER", "I-PER"], ranks_labels=False,
                                             new_tokens_bound=None)}

    def route(self, name, adapter, max_new_tokens):
        return Route(None, adapter, max_new_tokens)

    def task_for(self, route):
        return self.tasks["ner"]


def parse(texts):
    import json

    return parse_predict(json.dumps({"texts": texts}).encode(), "application/json", OneTask(), Limits())


@pytest.mark.parametrize("text, at", [("\x00", "U+0000 at character 1"), ("ab\x00c", "U+0000 at character 3"),
                                      ("bell\x07", "U+0007 at character 5"), ("x\x0bv", "U+000B at character 2"),
                                      ("\x0c", "U+000C at character 1"), ("\x1b[31mred", "U+001B at character 1"),
                                      ("a\x1fb", "U+001F at character 2"), ("del\x7f", "U+007F at character 4"),
                                      ("nel\x85", "U+0085 at character 4"), ("\x9f", "U+009F at character 1")])
def test_a_control_character_in_a_text_is_a_422_naming_it(text, at):
    with pytest.raises(ApiError) as e:
        parse(["fine", text])
    assert (e.value.status, e.value.field) == (422, "texts[1]")
    assert e.value.message.startswith(f"control character {at}; remove it")


def test_tab_newline_carriage_return_and_other_characters_pass():
    texts = ["John\tSmith visited\r\nLondon .", "no-break\u00a0space", "zero\u200bwidth", "\ufeffBOM", "café 😀"]
    assert parse(texts).texts == texts


def test_the_openapi_pattern_says_the_same():
    from tunelab.data.readers import CONTROL

    pattern = request_schema(Limits())["properties"]["texts"]["items"]["pattern"]
    for ch in map(chr, range(0xA1)):
        refused = CONTROL.fullmatch(ch) is not None
        assert (re.search(pattern, f"a{ch}b") is None) == refused, hex(ord(ch))
    assert re.search(pattern, " \t\n") is None and re.search(pattern, " x ")


def test_the_live_server_answers_422_for_a_nul(ner_run):
    from test_serve import live  # the uvicorn-in-a-thread server of the serve tests
    from tunelab.predict import Predictor

    with live(Predictor(ner_run[0], device="cpu")) as srv:
        r = srv.predict({"texts": ["Angela Merkel visited Paris .", "John\x00Smith"]})
        assert r.status_code == 422, r.text
        assert r.json()["error"] == {"field": "texts[1]", "message": "control character U+0000 at character 5; "
                                     "remove it (tab, line feed and carriage return are fine)"}
        r = srv.predict({"texts": ["John\tSmith visited\nLondon ."]})
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["text"] == "John\tSmith visited\nLondon ."
