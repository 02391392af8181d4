"""`tunelab serve`: the real uvicorn server on a loopback port, called over HTTP, on tiny trained models.

Most tests run uvicorn.Server in a thread of this process (so that a test can hold the model call with a gate
and see the batcher); one starts `python -m tunelab serve` as a process and stops it with SIGTERM.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from conftest import gen_overrides, tiny_overrides
from tunelab.data.examples import TextExample
from tunelab.errors import TunelabError
from tunelab.predict import Predictor, prediction_records, text_examples
from tunelab.serve import Limits, ModelService, ServeOptions, api_key, create_app
from tunelab.serve.batcher import BatchFailed, MicroBatcher, Overloaded

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["Peter Blackburn  visited Paris, said Reuters.", "John Smith works for Google in London .",
             "Siemens opened an office in Tokyo .", "The talks in Berlin ended without a deal .",
             "Angela Merkel visited New York .", "Maria Garcia works for Apple in Madrid .",
             "\tUnited Nations said on Monday that Hans Muller will lead it .", "Anna Müller 😀 flew to Zürich ."]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The server's model thread and the tests' own predictions on one core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def train_folder(out, overrides):
    from tunelab import finetune

    finetune(None, overrides)
    return out


@pytest.fixture(scope="module")
def ner_dir(ner_run):
    return ner_run[0]


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory, cls_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("serve-cls") / "out"
    return train_folder(out, tiny_overrides(tiny_model_dir, out, task="classify", **{
        "data.train": cls_dir / "train.jsonl", "data.dev": cls_dir / "dev.jsonl", "train.epochs": 3,
        "train.batch_size": 4, "train.lr": 5e-3, "train.threads": 1}))


@pytest.fixture(scope="module")
def mt_model(tmp_path_factory, conll_dir, cls_dir, tiny_model_dir):
    out = tmp_path_factory.mktemp("serve-mt") / "out"
    values = {"task": "multitask", "model.name": tiny_model_dir, "output_dir": out, "train.threads": 1,
              "train.epochs": 1, "train.batch_size": 8, "train.lr": 3e-3, "train.device": "cpu", "train.bf16": False,
              "tasks.ner.task": "ner", "tasks.ner.data.train": conll_dir / "train.conll",
              "tasks.ner.data.dev": conll_dir / "dev.conll", "tasks.topic.task": "classify",
              "tasks.topic.data.train": cls_dir / "train.jsonl", "tasks.topic.data.dev": cls_dir / "dev.jsonl"}
    return train_folder(out, [f"{k}={v}" for k, v in values.items()])


@pytest.fixture(scope="module")
def gen_model(tmp_path_factory, gen_dir, tiny_causal_dir):
    out = tmp_path_factory.mktemp("serve-gen") / "out"
    return train_folder(out, gen_overrides(gen_dir, tiny_causal_dir, out, **{"train.epochs": 1, "train.threads": 1}))


@pytest.fixture(scope="module")
def loaded():
    """One Predictor per folder for the whole module (each app gets its own ModelService around it)."""
    cache = {}

    def get(folder):
        if folder not in cache:
            cache[folder] = Predictor(folder, device="cpu")
        return cache[folder]

    return get


class LiveServer:
    """uvicorn.Server in a thread, on a free loopback port."""

    def __init__(self, app):
        self.app = app
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive())
        assert self.server.started, "the server did not start"
        self.client = httpx.Client(base_url=self.url, timeout=60)
        return self

    def __exit__(self, *exc):
        self.client.close()
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()
        assert not self.thread.is_alive(), "the server did not stop"

    @property
    def batcher(self) -> MicroBatcher:
        return self.app.state.batcher

    def predict(self, body, **kw) -> httpx.Response:
        return httpx.post(self.url + "/v1/predict", json=body, timeout=60, **kw)


def live(predictor, api_key=None, wrap=None, **limits) -> LiveServer:
    torch.set_num_threads(1)  # (a training fixture may have set more)
    service = ModelService(predictor)
    if wrap is not None:
        service.run = wrap(service.run)
    return LiveServer(create_app(service, Limits(**limits), api_key))


class Gate:
    """Wraps the model call: records each batch and holds it until `opened` is set."""

    def __init__(self, run):
        self.run, self.batches = run, []
        self.entered, self.opened = threading.Event(), threading.Event()

    def __call__(self, route, texts):
        self.batches.append((route, list(texts)))
        self.entered.set()
        assert self.opened.wait(60)
        return self.run(route, texts)


def gated():
    gates = []

    def wrap(run):
        gates.append(Gate(run))
        return gates[-1]

    return gates, wrap


def wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def expected(predictor, texts, task=None, max_new_tokens=None):
    """What `tunelab predict` writes for these texts: the records the server must return."""
    kind = predictor.task_meta(task)["task"]
    examples, offsets = text_examples(kind, [TextExample(t, None, "<t>", i) for i, t in enumerate(texts)])
    labels = predictor.task_meta(task)["labels"]
    predictions = predictor.predict(examples, task=task, max_new_tokens=max_new_tokens)
    return list(prediction_records(kind, labels, examples, predictions, offsets))


def same_records(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k not in ("entities", "score", "probabilities", "top_k")} == \
               {k: v for k, v in w.items() if k not in ("entities", "score", "probabilities")}
        if "entities" in w:
            assert [(e["type"], e["text"], e["start"], e["end"]) for e in g["entities"]] == \
                   [(e["type"], e["text"], e["start"], e["end"]) for e in w["entities"]]
            assert [e["score"] for e in g["entities"]] == pytest.approx([e["score"] for e in w["entities"]], abs=1e-5)
        if "probabilities" in w:
            assert list(g["probabilities"]) == list(w["probabilities"])
            assert list(g["probabilities"].values()) == pytest.approx(list(w["probabilities"].values()), abs=1e-5)


# --- NER, classification, generation, multi-task ------------------------------------------------------------


def test_ner_entities_with_offsets_into_the_original_text(ner_dir, loaded):
    pred = loaded(ner_dir)
    with live(pred, max_wait_ms=1) as srv:
        assert srv.client.get("/health").json() == {"status": "ok"}
        assert srv.client.get("/ready").json() == {"ready": True}
        info = srv.client.get("/v1/model").json()
        assert info["tasks"] == {"ner": {"kind": "ner", "labels": pred.meta["labels"],
                                         "entity_types": ["LOC", "ORG", "PER"]}}
        assert info["task_required"] is False and info["limits"]["max_texts"] == 64
        assert info["model"] == "out" and info["base_model"] == Path(str(pred.meta["base_model"])).name

        r = srv.predict({"texts": SENTENCES})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["task"] == "ner" and body["kind"] == "ner"
        same_records(body["results"], expected(pred, SENTENCES))
        found = set()
        for text, rec in zip(SENTENCES, body["results"]):
            assert rec["text"] == text
            for ent in rec["entities"]:
                assert text[ent["start"]:ent["end"]] == ent["text"]
                assert 0 < ent["score"] <= 1
                found.add((ent["type"], ent["text"], ent["start"]))
        # the trained tiny model knows the made-up names: the offsets are checked on real entities
        assert ("PER", "Peter Blackburn", 0) in found and ("LOC", "Paris", 25) in found
        # the task may be named even though there is only one
        same_records(srv.predict({"texts": SENTENCES[:1], "task": "ner"}).json()["results"], body["results"][:1])


ODD = ["\u200b", "a" * 10_000, "😀" * 300, "שלום עולם", "x\u0301\u0301", "<script>", "\ufeffBOM",
       "word " * 2000]


def test_odd_texts_do_not_break_the_model(ner_dir, cls_model, loaded):
    for folder in (ner_dir, cls_model):
        with live(loaded(folder)) as srv:
            r = srv.predict({"texts": ODD})
            assert r.status_code == 200, r.text
            assert [rec["text"] for rec in r.json()["results"]] == ODD
            for text, rec in zip(ODD, r.json()["results"]):
                for ent in rec.get("entities", []):
                    assert text[ent["start"]:ent["end"]] == ent["text"]
            long = r.json()["results"][-1]
            if "tokens" in long:  # windowed, not truncated
                assert len(long["tokens"]) == len(long["tags"]) == 2000


def test_classification_probabilities_and_top_k(cls_model, loaded):
    pred = loaded(cls_model)
    labels = pred.meta["labels"]
    texts = ["The striker scored twice", "Shares fell 4 percent on Monday", "The new phone has a faster chip"]
    with live(pred) as srv:
        assert srv.client.get("/v1/model").json()["tasks"] == {"classify": {"kind": "classify", "labels": labels,
                                                                               "pairs": False}}
        body = srv.predict({"texts": texts, "top_k": 2}).json()
        assert body["kind"] == "classify"
        same_records(body["results"], expected(pred, texts))
        for rec in body["results"]:
            probs = rec["probabilities"]
            assert list(probs) == labels and sum(probs.values()) == pytest.approx(1, abs=1e-6)
            assert rec["label"] == max(probs, key=probs.get) and rec["score"] == probs[rec["label"]]
            assert len(rec["top_k"]) == 2
            assert [t["label"] for t in rec["top_k"]] == sorted(probs, key=probs.get, reverse=True)[:2]
            assert rec["top_k"][0]["score"] >= rec["top_k"][1]["score"]
        assert "top_k" not in srv.predict({"texts": texts[:1]}).json()["results"][0]
        r = srv.predict({"texts": texts, "top_k": len(labels) + 1})
        assert r.status_code == 422 and r.json()["error"]["field"] == "top_k"


def test_multitask_routing_by_task_name(mt_model, loaded):
    pred = loaded(mt_model)
    gates, wrap = gated()
    with live(pred, wrap=wrap, max_wait_ms=50) as srv:
        gate = gates[0]
        info = srv.client.get("/v1/model").json()
        assert info["multitask"] and info["task_required"]
        assert {n: t["kind"] for n, t in info["tasks"].items()} == {"ner": "ner", "topic": "classify"}
        r = srv.predict({"texts": ["John Smith visited Paris ."]})
        assert r.status_code == 422 and r.json()["error"]["field"] == "task" and "ner, topic" in r.text
        r = srv.predict({"texts": ["x"], "task": "nope"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "task"

        # Held model: requests for both tasks queue up; each forward pass serves one task only.
        requests = [("topic", "The team won the match 3 to nil"), ("ner", SENTENCES[1]), ("topic", SENTENCES[2]),
                    ("ner", SENTENCES[4]), ("topic", "Profits at the company doubled")]
        with ThreadPoolExecutor(len(requests)) as pool:
            first = pool.submit(srv.predict, {"texts": [requests[0][1]], "task": requests[0][0]})
            assert gate.entered.wait(60)
            rest = [pool.submit(srv.predict, {"texts": [t], "task": task}) for task, t in requests[1:]]
            wait_until(lambda: srv.batcher.queued == len(requests) - 1)
            gate.opened.set()
            responses = [first.result()] + [f.result() for f in rest]
        for (task, text), r in zip(requests, responses):
            assert r.status_code == 200, r.text
            assert r.json()["task"] == task
            same_records(r.json()["results"], expected(pred, [text], task=task))
        # (the queued requests came from parallel threads, so either task may have been first)
        batches = [(route.task, len(texts)) for route, texts in gate.batches]
        assert batches[0] == ("topic", 1) and sorted(batches[1:]) == [("ner", 2), ("topic", 2)]


def test_generation_with_a_bounded_number_of_new_tokens(gen_model, loaded):
    pred = loaded(gen_model)
    bound = pred.task.max_target_length
    prompts = ["copy: red cat sun", "copy: moon tree"]
    with live(pred) as srv:
        assert srv.client.get("/v1/model").json()["tasks"] == {"generate": {"kind": "generate",
                                                                            "max_new_tokens": bound}}
        body = srv.predict({"texts": prompts}).json()
        assert body["kind"] == "generate"
        assert body["results"] == expected(pred, prompts)
        short = srv.predict({"texts": prompts, "max_new_tokens": 2}).json()["results"]
        assert short == expected(pred, prompts, max_new_tokens=2)
        assert pred.task.max_target_length == bound  # a request's bound never touches the task
        for rec in short:
            assert len(pred.task.tokenizer(rec["output"], add_special_tokens=False)["input_ids"]) <= 2
        for bad in ({"max_new_tokens": bound + 1}, {"max_new_tokens": 0}, {"top_k": 1}):
            r = srv.predict({"texts": prompts} | bad)
            assert r.status_code == 422 and r.json()["error"]["field"] == next(iter(bad))


def test_adapters_chosen_per_request(tmp_path, cls_dir, tiny_model_dir, loaded):
    """Two LoRA adapters on one base, the second with other labels: each request names its adapter."""
    two = tmp_path / "two-labels"
    two.mkdir()
    for split in ("train", "dev"):
        recs = [json.loads(x) for x in (cls_dir / f"{split}.jsonl").read_text().splitlines()]
        (two / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if r["label"] != "business"))
    folders = {}
    for name, data in (("three", cls_dir), ("two", two)):
        out = tmp_path / f"model-{name}"
        folders[name] = train_folder(out, tiny_overrides(tiny_model_dir, out, task="classify", **{
            "data.train": data / "train.jsonl", "data.dev": data / "dev.jsonl", "train.epochs": 2,
            "train.batch_size": 8, "train.lr": 1e-2, "train.threads": 1, "tune.method": "lora"}))
    both = Predictor(folders["three"], device="cpu")
    both.add_adapter("two", folders["two"])
    texts = ["The striker scored twice", "Engineers released a software update"]
    with live(both) as srv:
        info = srv.client.get("/v1/model").json()
        assert info["adapters"] == {"default": {"labels": ["business", "sport", "tech"]},
                                    "two": {"labels": ["sport", "tech"]}}
        for adapter, folder in ((None, "three"), ("default", "three"), ("two", "two")):
            r = srv.predict({"texts": texts} | ({"adapter": adapter} if adapter else {}))
            assert r.status_code == 200, r.text
            same_records(r.json()["results"], expected(loaded(folders[folder]), texts))
        r = srv.predict({"texts": texts, "adapter": "two", "top_k": 3})
        assert r.status_code == 422 and r.json()["error"]["field"] == "top_k"
        r = srv.predict({"texts": texts, "adapter": "four"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "adapter" and "default, two" in r.text


# --- bad requests, auth -------------------------------------------------------------------------------------


def post_raw(srv, content, content_type="application/json"):
    headers = {"content-type": content_type} if content_type else {}
    return srv.client.post("/v1/predict", content=content, headers=headers)


BAD = [  # (body, status, field, words in the message)
    (b"{not json", 400, "body", "not valid JSON"),
    (b"", 400, "body", "empty body"),
    (b"[1, 2]", 422, "body", "JSON object"),
    (b'"texts"', 422, "body", "JSON object"),
    (b"{}", 422, "texts", "required"),
    (b'{"texts": "one text"}', 422, "texts", "list"),
    (b'{"texts": ["ok", 7]}', 422, "texts[1]", "string"),
    (b'{"texts": ["ok", null]}', 422, "texts[1]", "string"),
    (b'{"texts": []}', 422, "texts", "at least one"),
    (b'{"texts": ["a", "b", "c", "d", "e"]}', 422, "texts", "at most 4"),
    (b'{"texts": ["ok", " \\n\\t "]}', 422, "texts[1]", "empty"),
    (b'{"texts": [""]}', 422, "texts[0]", "empty"),
    (json.dumps({"texts": ["ok", "x" * 51]}).encode(), 422, "texts[1]", "at most 50"),
    (b'{"texts": ["ok"], "text": "typo"}', 422, "text", "unknown field"),
    (b'{"texts": ["ok"], "task": "topic"}', 422, "task", "unknown task"),
    (b'{"texts": ["ok"], "task": 3}', 422, "task", "string"),
    (b'{"texts": ["ok"], "top_k": 2}', 422, "top_k", "classification"),
    (b'{"texts": ["ok"], "top_k": true}', 422, "top_k", "integer"),
    (b'{"texts": ["ok"], "top_k": "2"}', 422, "top_k", "integer"),
    (b'{"texts": ["ok"], "max_new_tokens": 5}', 422, "max_new_tokens", "generation"),
    (b'{"texts": ["ok"], "adapter": "b"}', 422, "adapter", "unknown adapter"),
    (b'{"texts": ["ok", "caf\xe9 ok"]}', 422, "texts[1]", "UTF-8"),  # latin-1 bytes
    (b'{"texts": ["\\ud800 lone surrogate"]}', 422, "texts[0]", "UTF-8"),
    (b'{"texts": ["ok"], "\xff": 1}', 422, "\\udcff", "UTF-8"),
    (b"[" * 5000 + b"]" * 5000, 400, "body", ""),
    (b'{"texts": ["ok"], "top_k": 1' + b"0" * 5000 + b"}", 400, "body", ""),
]


def test_each_bad_request_gets_its_4xx_naming_the_field(ner_dir, loaded):
    with live(loaded(ner_dir), max_texts=4, queue_size=8, max_chars=50, max_body_bytes=20_000) as srv:
        for body, status, field, words in BAD:
            r = post_raw(srv, body)
            assert (r.status_code, r.json()["error"]["field"]) == (status, field), (body[:60], r.text)
            assert words in r.json()["error"]["message"], (body[:60], r.text)
        r = post_raw(srv, b'{"texts": ["ok"]}', "text/plain")
        assert r.status_code == 415 and r.json()["error"]["field"] == "content-type"
        assert post_raw(srv, b'{"texts": ["ok"]}', None).status_code == 200  # no Content-Type: read as JSON
        big = json.dumps({"texts": ["y" * 40] * 600}).encode()
        r = post_raw(srv, big)  # refused on its Content-Length, before the body is read
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"
        r = srv.client.post("/v1/predict", content=iter([big[:10_000], big[10_000:]]),
                            headers={"content-type": "application/json"})  # chunked: no Content-Length
        assert r.status_code == 413 and r.json()["error"]["field"] == "body"
        r = srv.client.get("/v1/predict")
        assert r.status_code == 405 and r.json()["error"]["message"]
        assert srv.client.get("/nowhere").status_code == 404
        # none of it hurt the server
        r = srv.predict({"texts": ["John Smith visited London ."]})
        assert r.status_code == 200 and r.json()["results"][0]["tokens"][0] == "John"
        metrics = srv.client.get("/metrics").text
        assert 'tunelab_predict_requests_total{status="422"}' in metrics and "tunelab_failed_total 0" in metrics


def test_a_failing_model_call_is_a_500_without_details(ner_dir, loaded):
    def wrap(run):
        def call(route, texts):
            if any("boom" in t for t in texts):
                raise RuntimeError("secret internal detail")
            return run(route, texts)
        return call

    with live(loaded(ner_dir), wrap=wrap) as srv:
        r = srv.predict({"texts": ["boom goes the model"]})
        assert r.status_code == 500
        assert r.json()["error"]["field"] is None
        assert "secret" not in r.text and "Traceback" not in r.text
        assert srv.predict({"texts": ["John Smith visited London ."]}).status_code == 200
        assert "tunelab_failed_total 1" in srv.client.get("/metrics").text


def test_api_key(ner_dir, loaded):
    with live(loaded(ner_dir), api_key="s3cret-key") as srv:
        assert srv.client.get("/health").status_code == 200
        assert srv.client.get("/ready").status_code == 200
        wrong = ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cret-ke"}, {"Authorization": "s3cret-key"})
        for headers in wrong:
            r = srv.client.get("/v1/model", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert "API key" in r.json()["error"]["message"]
        assert srv.predict({"texts": ["John Smith"]}).status_code == 401
        assert srv.client.get("/v1/model", headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        assert srv.client.get("/v1/model", headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert srv.predict({"texts": ["John Smith"]}, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        schemes = srv.client.get("/openapi.json").json()["components"]["securitySchemes"]
        assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    with live(loaded(ner_dir)) as srv:  # off by default
        assert srv.client.get("/v1/model").status_code == 200
        assert "securitySchemes" not in srv.client.get("/openapi.json").json().get("components", {})


def test_api_key_sources(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_KEY", raising=False)
    assert api_key(ServeOptions("m", api_key_env="MY_KEY")) is None
    monkeypatch.setenv("MY_KEY", "from-env")
    assert api_key(ServeOptions("m", api_key_env="MY_KEY")) == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert api_key(ServeOptions("m", api_key_env="MY_KEY", api_key_file=str(tmp_path / "key"))) == "from-file"
    monkeypatch.setenv("MY_KEY", " ")
    with pytest.raises(TunelabError, match="MY_KEY is set but empty"):
        api_key(ServeOptions("m", api_key_env="MY_KEY"))
    (tmp_path / "key").write_text("")
    with pytest.raises(TunelabError, match="empty"):
        api_key(ServeOptions("m", api_key_file=str(tmp_path / "key")))


def test_openapi_document(ner_dir, loaded):
    with live(loaded(ner_dir), max_texts=16, max_chars=500) as srv:
        doc = srv.client.get("/openapi.json").json()
    assert {"/health", "/ready", "/metrics", "/v1/model", "/v1/predict"} <= set(doc["paths"])
    post = doc["paths"]["/v1/predict"]["post"]
    texts = post["requestBody"]["content"]["application/json"]["schema"]["properties"]["texts"]
    assert (texts["maxItems"], texts["items"]["maxLength"]) == (16, 500)
    assert {"200", "400", "413", "415", "422", "503"} <= set(post["responses"])
    assert {"PredictResponse", "ErrorBody", "Entity", "ClassifyResult"} <= set(doc["components"]["schemas"])


# --- batching, overload, shutdown ---------------------------------------------------------------------------


def test_concurrent_requests_share_one_forward_pass(ner_dir, loaded):
    pred = loaded(ner_dir)
    gates, wrap = gated()
    with live(pred, wrap=wrap, max_batch=8) as srv:
        gate = gates[0]
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(srv.predict, {"texts": [SENTENCES[0]]})
            assert gate.entered.wait(60)
            rest = [pool.submit(srv.predict, {"texts": [t]}) for t in SENTENCES[1:]]
            wait_until(lambda: srv.batcher.queued == len(SENTENCES) - 1)
            gate.opened.set()
            responses = [first.result()] + [f.result() for f in rest]
        assert [len(texts) for _, texts in gate.batches] == [1, len(SENTENCES) - 1]
        for text, r in zip(SENTENCES, responses):
            assert r.status_code == 200, r.text
            same_records(r.json()["results"], expected(pred, [text]))
        metrics = srv.client.get("/metrics").text
        assert f"tunelab_batch_size_max {len(SENTENCES) - 1}" in metrics
        assert "tunelab_batch_size_count 2" in metrics and f"tunelab_batch_size_sum {len(SENTENCES)}" in metrics


def test_overload_gets_503_with_retry_after_at_once(ner_dir, loaded):
    gates, wrap = gated()
    with live(loaded(ner_dir), wrap=wrap, max_batch=1, queue_size=2, max_texts=2) as srv:
        gate = gates[0]
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(srv.predict, {"texts": ["John Smith visited London ."]})
            assert gate.entered.wait(60)
            queued = pool.submit(srv.predict, {"texts": ["Siemens opened an office .", "Hans Muller left ."]})
            wait_until(lambda: srv.batcher.queued == 2)
            r = srv.predict({"texts": ["one more"]})  # answered while the model is still held
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["field"] is None and "queue is full" in r.json()["error"]["message"]
            assert not gate.opened.is_set()
            gate.opened.set()
            assert running.result().status_code == 200 and queued.result().status_code == 200
        assert [len(t) for _, t in gate.batches] == [1, 1, 1]  # max_batch=1 cut the two-text request
        assert "tunelab_rejected_total 1" in srv.client.get("/metrics").text


def test_shutdown_answers_the_requests_under_way(ner_dir, loaded):
    gates, wrap = gated()
    srv = live(loaded(ner_dir), wrap=wrap, max_batch=2)
    with srv:
        gate = gates[0]
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(srv.predict, {"texts": [SENTENCES[0]]})]
            assert gate.entered.wait(60)
            futures += [pool.submit(srv.predict, {"texts": [t]}) for t in SENTENCES[1:4]]
            wait_until(lambda: srv.batcher.queued == 3)
            srv.server.should_exit = True  # what SIGTERM does
            time.sleep(0.3)
            assert srv.thread.is_alive()  # waiting for the requests under way
            gate.opened.set()
            assert [f.result().status_code for f in futures] == [200] * 4
            srv.thread.join(60)
        assert srv.batcher.stats.items == 4 and not srv.batcher.accepting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_process_with_env_api_key_and_sigterm(ner_dir, tmp_path):
    port = free_port()
    env = dict(os.environ, TUNELAB_API_KEY="k-123", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(ner_dir), "--port", str(port),
                                 "--threads", "1", "--device", "cpu"], cwd=REPO, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            assert proc.poll() is None, log_path.read_text()
            try:
                return httpx.get(url + "/ready", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, timeout=180)
        assert httpx.get(url + "/v1/model").status_code == 401
        r = httpx.post(url + "/v1/predict", json={"texts": [SENTENCES[0]]}, headers={"Authorization": "Bearer k-123"})
        assert r.status_code == 200 and r.json()["results"][0]["text"] == SENTENCES[0]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        proc.kill()
        proc.wait()
    text = log_path.read_text()
    assert proc.returncode in (0, -signal.SIGTERM), text  # uvicorn re-raises the signal once it has shut down
    assert "shutting down" in text and "batcher stopped after 1 batches" in text and "Traceback" not in text


def test_cli_serve_refuses_bad_arguments(tmp_path, capsys):
    from tunelab.cli import main

    assert main(["serve", str(tmp_path / "nothing")]) == 2
    assert "not a tunelab model folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--max-texts", "10", "--queue-size", "5"]) == 2
    assert "--max-texts (10) is larger than --queue-size (5)" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--adapter", "nameonly"]) == 2
    assert "NAME=DIR" in capsys.readouterr().err


# --- the batcher alone --------------------------------------------------------------------------------------


def run_async(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_batcher_groups_by_key_cuts_large_requests_and_keeps_order():
    calls = []

    def model(key, items):
        calls.append((key, list(items)))
        return [f"{key}{x}" for x in items]

    async def main():
        b = MicroBatcher(model, max_batch=4, max_wait_s=0.05, queue_size=100)
        await b.start()
        results = await asyncio.gather(b.submit("a", [1]), b.submit("b", [2]), b.submit("a", [3, 4, 5, 6, 7, 8]),
                                       b.submit("a", [9]), b.submit("b", [10, 11]))
        await b.close()
        return results, b

    results, b = run_async(main())
    assert results == [["a1"], ["b2"], ["a3", "a4", "a5", "a6", "a7", "a8"], ["a9"], ["b10", "b11"]]
    assert all(len(items) <= 4 for _, items in calls)
    # oldest first; a batch holds one key; requests enter whole parts, in arrival order
    assert calls == [("a", [1]), ("b", [2, 10, 11]), ("a", [3, 4, 5, 6]), ("a", [7, 8, 9])]
    assert b.stats.batches == 4 and b.stats.items == 11 and b.queued == 0


def test_batcher_rejects_at_once_skips_gone_clients_and_drains_on_close():
    held, calls = threading.Event(), []

    def model(key, items):
        calls.append(list(items))
        held.wait(60)
        return items

    async def main():
        b = MicroBatcher(model, max_batch=2, max_wait_s=0.0, queue_size=3)
        await b.start()
        first = asyncio.create_task(b.submit("k", ["first"]))
        while not calls:
            await asyncio.sleep(0.001)
        gone = asyncio.create_task(b.submit("k", ["gone"]))
        waiting = asyncio.create_task(b.submit("k", ["w1", "w2"]))
        await asyncio.sleep(0.01)
        assert b.queued == 3
        with pytest.raises(Overloaded, match="queue is full"):
            await b.submit("k", ["no room"])
        gone.cancel()
        closing = asyncio.create_task(b.close())  # asked to stop with requests queued
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded, match="shutting down"):
            await b.submit("k", ["too late"])
        held.set()
        await closing
        return await first, await waiting, b

    first, waiting, b = run_async(main())
    assert (first, waiting) == (["first"], ["w1", "w2"])
    assert calls == [["first"], ["w1", "w2"]]  # the cancelled request never reached the model
    assert b.stats.rejected == 1 and not b.accepting


def test_batcher_isolates_the_request_that_breaks_the_model():
    def model(key, items):
        if "bad" in items:
            raise ValueError("cannot")
        return [x.upper() for x in items]

    async def main():
        b = MicroBatcher(model, max_batch=8, max_wait_s=0.05, queue_size=10)
        await b.start()
        out = await asyncio.gather(b.submit("k", ["a"]), b.submit("k", ["bad", "b"]), b.submit("k", ["c"]),
                                   return_exceptions=True)
        after = await b.submit("k", ["d"])
        await b.close()
        return out, after, b

    (a, bad, c), after, b = run_async(main())
    assert (a, c, after) == (["A"], ["C"], ["D"]) and isinstance(bad, BatchFailed)
    assert b.stats.failed == 1


def test_batcher_waits_for_company_only_under_concurrent_load():
    """A lone request runs at once even with a long window; once a forward pass has served several requests,
    the next batch waits (up to max_wait) for more."""
    calls = []

    def model(key, items):
        calls.append(list(items))
        return items

    async def main():
        b = MicroBatcher(model, max_batch=8, max_wait_s=30.0, queue_size=100)
        await b.start()
        assert await asyncio.wait_for(b.submit("k", ["alone"]), 10) == ["alone"]  # not 30 s later
        assert await asyncio.gather(b.submit("k", ["a"]), b.submit("k", ["b"])) == [["a"], ["b"]]
        first = asyncio.create_task(b.submit("k", ["c"]))
        await asyncio.sleep(0.2)  # the window is open: c waits
        assert not first.done()
        late = asyncio.create_task(b.submit("k", [f"d{i}" for i in range(7)]))  # fills the batch: runs now
        await asyncio.wait_for(asyncio.gather(first, late), 10)
        await b.close()

    run_async(main())
    assert calls == [["alone"], ["a", "b"], ["c"] + [f"d{i}" for i in range(7)]]
