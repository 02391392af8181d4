"""Property-based fuzzing of the real server from its own OpenAPI document (schemathesis on hypothesis):
requests that fit the schema and requests that break it, to every operation, over HTTP on loopback. No
request may get a 5xx, and every error is the documented JSON error body."""

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from test_serve import live  # the uvicorn-in-a-thread server of the serve tests


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_from_the_openapi_document_gets_a_5xx(ner_run, mode):
    from tunelab.predict import Predictor

    # Small limits keep generated requests (and forward passes on them) small; the document carries them.
    with live(Predictor(ner_run[0], device="cpu"), max_texts=4, max_chars=200, queue_size=16) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json")
        seen = {}

        @given(case=schema.as_strategy(schemathesis.GenerationMode(mode)))
        @settings(max_examples=80, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
        def call(case):
            response = case.call(base_url=srv.url, timeout=60)
            key = f"{case.method} {case.path}"
            seen.setdefault(key, set()).add(response.status_code)
            assert response.status_code < 500, (key, case.body, response.text)
            if response.status_code >= 400:
                error = response.json()["error"]
                assert isinstance(error["message"], str) and error["message"], response.text

        call()
        assert srv.batcher.stats.failed == 0
    assert set().union(*seen.values()) <= {200, 400, 404, 405, 413, 415, 422}, seen
    if mode == "positive":  # every operation, and valid requests reached the model
        assert {"GET /health", "GET /ready", "GET /v1/model", "GET /metrics"} <= set(seen), seen
        assert 200 in seen["POST /v1/predict"], seen
    else:  # only the prediction request has a body to break; the checks turned it down
        assert 422 in seen["POST /v1/predict"], seen
