"""The HTTP contract: request and response shapes (which the OpenAPI document shows), the limits, and the
checks that turn any request body into either a valid `Request` or an `ApiError` naming the field.

Error bodies are always `{"error": {"field": FIELD or null, "message": ...}}`; fields are written as
`texts[2]`. 400: not JSON at all; 413: body too large; 415: not JSON content; 422: valid JSON that breaks
the contract (wrong type, unknown field, empty or too long text, a control character in a text, unknown task,
a limit).
"""

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from tunelab.data.readers import CONTROL_RANGES, control_character
from tunelab.serve.model import ModelService, Route, raw_examples


@dataclass(frozen=True)
class Limits:
    max_batch: int = 32  # texts per forward pass
    max_wait_ms: float = 5.0  # how long the first text of a batch waits for others
    queue_size: int = 256  # texts waiting for a forward pass; more -> 503
    max_texts: int = 64  # texts per request
    max_chars: int = 10_000  # characters per text
    max_body_bytes: int = 1_000_000

    def check(self) -> None:
        """Raises ValueError naming the option (as a command-line flag) when the limits cannot work."""
        for name in ("max_batch", "queue_size", "max_texts", "max_chars", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_wait_ms < 0:
            raise ValueError("--max-wait-ms must not be negative")
        if self.max_texts > self.queue_size:
            raise ValueError(f"--max-texts ({self.max_texts}) is larger than --queue-size ({self.queue_size}): "
                             "a full request could never be queued")


class ApiError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.field, self.headers = status, message, field, headers or {}

    def body(self) -> dict:
        return {"error": {"field": _printable(self.field), "message": _printable(self.message)}}


# --- shapes -------------------------------------------------------------------------------------------------


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    texts: list[StrictStr] = Field(description="The raw texts (for generation: the prompts; for extractive QA: "
                                               "the questions; for relation extraction: texts with <e1:TYPE>..</e1> "
                                               "and <e2:TYPE>..</e2> marks).")
    text_pairs: list[StrictStr] | None = Field(None, description="One second text per text, for a model of text "
                                                                 "pairs (GET /v1/model: pairs) or extractive QA "
                                                                 "(the context of each question).")
    task: StrictStr | None = Field(None, description="The task name (GET /v1/model); required when the model "
                                                     "serves several tasks.")
    adapter: StrictStr | None = Field(None, description="An adapter name (GET /v1/model), when several are loaded.")
    top_k: StrictInt | None = Field(None, ge=1, description="Classification: also return the k most probable "
                                                            "labels, most probable first.")
    max_new_tokens: StrictInt | None = Field(None, ge=1, description="Generation: at most this many new tokens "
                                                                     "(greedy decoding), up to the model's bound.")


class ErrorDetail(BaseModel):
    field: str | None = Field(description="The offending request field, e.g. texts[2]; null when none is.")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class Entity(BaseModel):
    type: str
    text: str = Field(description="The entity's text: the original text's [start, end) slice.")
    start: int = Field(description="Offset of the first character in the original text, in Unicode code points.")
    end: int = Field(description="Offset just after the last character, in Unicode code points.")
    score: float = Field(description="Mean probability of the entity's word tags.")


class NerResult(BaseModel):
    text: str
    tokens: list[str] = Field(description="The words the text was split into.")
    tags: list[str] = Field(description="An IOB2 tag per word.")
    entities: list[Entity]


class Scored(BaseModel):
    label: str
    score: float


class ClassifyResult(BaseModel):
    text: str
    text_pair: str | None = None
    label: str
    score: float
    probabilities: dict[str, float] = Field(description="Probability of every label, by name (sums to 1).")
    top_k: list[Scored] | None = Field(None, description="With top_k in the request: the k most probable labels.")


class GenerateResult(BaseModel):
    prompt: str
    output: str


class RegressResult(BaseModel):
    text: str
    text_pair: str | None = None
    score: float = Field(description="The predicted value, on the training data's scale.")


class MultiLabelResult(BaseModel):
    text: str
    text_pair: str | None = None
    labels: list[str] = Field(description="Every label whose probability reaches the model's threshold.")
    probabilities: dict[str, float] = Field(description="Each label's own probability (they need not sum to 1).")
    top_k: list[Scored] | None = None


class QAResult(BaseModel):
    question: str
    answer: str = Field(description="The context's own [start, end) slice; empty when the model finds no answer.")
    start: int = Field(description="Offset of the answer in the context, in code points; -1 for no answer.")
    end: int
    score: float = Field(description="Start + end logit of the answer span.")


class Mention(BaseModel):
    start: int
    end: int
    type: str
    text: str


class RelationResult(BaseModel):
    text: str = Field(description="The text without its marks; mention offsets refer to it.")
    head: Mention
    tail: Mention
    label: str
    score: float
    probabilities: dict[str, float]
    top_k: list[Scored] | None = None


class PredictResponse(BaseModel):
    task: str
    kind: str = Field(description="ner, classify, generate, regress, multilabel, qa or relation.")
    results: list[NerResult | ClassifyResult | GenerateResult | RegressResult | MultiLabelResult | QAResult |
                  RelationResult] = Field(description="One per text, in order.")


def request_schema(limits: Limits) -> dict:
    """The request body's JSON schema, with this server's limits in it."""
    schema = PredictRequest.model_json_schema()
    texts = schema["properties"]["texts"]
    texts.update(minItems=1, maxItems=limits.max_texts)
    # a character that is not white space, and no control character (tab, line feed, carriage return are fine)
    texts["items"].update(minLength=1, maxLength=limits.max_chars,
                          pattern=rf"^[^{CONTROL_RANGES}]*[^\s{CONTROL_RANGES}][^{CONTROL_RANGES}]*$")
    pairs = next(a for a in schema["properties"]["text_pairs"]["anyOf"] if a.get("type") == "array")
    pairs.update(minItems=1, maxItems=limits.max_texts)
    pairs["items"].update(texts["items"])
    return schema


# --- checks -------------------------------------------------------------------------------------------------


@dataclass
class Request:
    texts: list  # the texts, or (text, text_pair) pairs
    task: str  # the API's task name
    kind: str
    route: Route
    top_k: int | None


def parse_predict(body: bytes, content_type: str | None, service: ModelService, limits: Limits) -> Request:
    if content_type is not None and "json" not in content_type.split(";")[0].lower():
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), not {content_type}",
                       "content-type")
    obj = _json(body)
    for key in obj if isinstance(obj, dict) else ():
        _check_utf8(key, key)  # a field name with invalid bytes (shown escaped)
    try:
        req = PredictRequest.model_validate(obj)
    except ValidationError as e:
        err = e.errors()[0]
        raise ApiError(422, _message(err), _field(err["loc"])) from None
    for name in ("task", "adapter"):
        if getattr(req, name) is not None:
            _check_utf8(getattr(req, name), name)
    if not req.texts:
        raise ApiError(422, "give at least one text", "texts")
    if len(req.texts) > limits.max_texts:
        raise ApiError(422, f"{len(req.texts)} texts; at most {limits.max_texts} per request", "texts")
    if req.text_pairs is not None and len(req.text_pairs) != len(req.texts):
        raise ApiError(422, f"{len(req.text_pairs)} text_pairs for {len(req.texts)} texts; give one per text",
                       "text_pairs")
    for i, (text, field) in enumerate([(t, f"texts[{i}]") for i, t in enumerate(req.texts)] +
                                      [(t, f"text_pairs[{i}]") for i, t in enumerate(req.text_pairs or [])]):
        if len(text) > limits.max_chars:
            raise ApiError(422, f"{len(text)} characters; at most {limits.max_chars} per text", field)
        control = control_character(text)  # the same characters a file may not hold (tunelab.data.readers)
        if control:
            raise ApiError(422, f"{control}; remove it (tab, line feed and carriage return are fine)", field)
        if not text.strip():
            raise ApiError(422, "empty text (nothing but white space)", field)
        _check_utf8(text, field)

    name = _task_name(req.task, service)
    if req.adapter is not None and req.adapter not in service.adapters:
        have = ", ".join(service.adapters) or "none"
        raise ApiError(422, f"unknown adapter {req.adapter!r}; loaded adapters: {have}", "adapter")
    route = service.route(name, req.adapter, req.max_new_tokens)
    task = service.task_for(route)
    if req.top_k is not None:
        if not task.ranks_labels:
            raise ApiError(422, f"top_k is for classification; task {name!r} is {task.kind}", "top_k")
        if req.top_k > len(task.labels):
            raise ApiError(422, f"top_k is {req.top_k}, but there are {len(task.labels)} labels", "top_k")
    if req.max_new_tokens is not None:
        if task.new_tokens_bound is None:
            raise ApiError(422, f"max_new_tokens is for generation; task {name!r} is {task.kind}", "max_new_tokens")
        if req.max_new_tokens > task.new_tokens_bound:
            raise ApiError(422, f"max_new_tokens is {req.max_new_tokens}; this model allows at most "
                                f"{task.new_tokens_bound}", "max_new_tokens")
    wants = getattr(task, "pairs", False)  # (a task that reads two texts per input says so)
    if wants and req.text_pairs is None:
        raise ApiError(422, f"task {name!r} ({task.kind}) reads two texts per input: give the second ones (text "
                            "pairs' second texts, QA's contexts) as text_pairs", "text_pairs")
    if not wants and req.text_pairs is not None:
        raise ApiError(422, f"task {name!r} ({task.kind}) reads single texts; leave text_pairs out", "text_pairs")
    items = req.texts if req.text_pairs is None else list(zip(req.texts, req.text_pairs))
    if hasattr(task, "text_examples"):
        # what the task reads of a raw text must be there (relation extraction's <e1>/<e2> marks): a malformed
        # text is the request's mistake (422 naming it), not a failed batch
        from tunelab.errors import TunelabError

        raw = raw_examples(items)
        try:
            task.text_examples(raw)
        except TunelabError:  # (the whole request in one call; the texts one by one only to name the bad one)
            for i, r in enumerate(raw):
                try:
                    task.text_examples([r])
                except TunelabError as e:
                    raise ApiError(422, str(e).split(": ", 1)[-1], f"texts[{i}]") from None
            raise
    return Request(items, name, task.kind, route, req.top_k)


def _json(body: bytes):
    if not body.strip():
        raise ApiError(400, "empty body; send a JSON object with a 'texts' list", "body")
    # Invalid UTF-8 bytes survive decoding as lone surrogates, so that the field holding them can be named.
    try:
        return json.loads(body.decode("utf-8", "surrogateescape"))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})", "body") from None
    except (ValueError, RecursionError) as e:  # an integer of thousands of digits, nesting thousands deep
        raise ApiError(400, f"not acceptable JSON: {str(e)[:200] or type(e).__name__}", "body") from None


def _check_utf8(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(422, f"not valid UTF-8 text (at character {e.start})", field) from None


def _task_name(task: str | None, service: ModelService) -> str:
    names = list(service.tasks)
    if task is None:
        if service.multitask:
            raise ApiError(422, f"this model serves several tasks; name one of {', '.join(names)}", "task")
        return names[0]
    if task not in service.tasks:
        raise ApiError(422, f"unknown task {task!r}; this model serves {', '.join(names)}", "task")
    return task


def _printable(text: str | None) -> str | None:
    """Lone surrogates (from invalid UTF-8, say in an unknown field's name) written as escapes: a response
    must always encode."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def _field(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _message(err: dict) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field; the fields are " + ", ".join(PredictRequest.model_fields)
    if kind == "missing":
        return "required"
    if kind == "model_type":
        return "the body must be a JSON object, e.g. {\"texts\": [\"...\"]}"
    return err["msg"]
