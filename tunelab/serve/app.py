"""The FastAPI application: routes, API-key check, body-size limit, error bodies, lifespan and metrics.

    GET  /health       liveness: the process answers (never needs a key)
    GET  /ready        200 while the model takes requests; 503 before start-up ends and while shutting down
    GET  /metrics      Prometheus text: requests by outcome, batch sizes, queue depth
    GET  /v1/model     tasks, labels, base model, adapters, limits
    POST /v1/predict   {"texts": [...], "text_pairs": [...], "task": ..., "top_k": ..., "max_new_tokens": ...}
                       -> a result per text (text_pairs: pair models' second texts, QA's contexts)
    GET  /openapi.json the OpenAPI document (and /docs)

Shutdown (SIGTERM / Ctrl-C): uvicorn stops accepting connections and waits for the requests under way; the
lifespan's end then lets the batcher answer whatever is still queued before the model thread stops.
"""

import contextlib
import hmac
import logging
from collections import Counter
from dataclasses import asdict

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

from tunelab.serve.api import ApiError, ErrorBody, Limits, PredictResponse, parse_predict, request_schema
from tunelab.serve.batcher import BatchFailed, MicroBatcher, Overloaded
from tunelab.serve.model import ModelService

log = logging.getLogger("tunelab.serve")

RETRY_AFTER_S = 1
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """Refuses a body over `max_bytes` with 413: by its Content-Length before reading any of it, and while
    reading a body sent without one (chunked)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await _error(ApiError(400, "Content-Length is not a number", "content-length"))(
                    scope, receive, send)
            if int(length) > self.max_bytes:
                return await _error(_too_large(self.max_bytes))(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge()
            return message

        await self.app(scope, counted, send)


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the body is larger than {max_bytes} bytes (--max-body-bytes)", "body")


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), e.status, headers=e.headers)


def create_app(service: ModelService, limits: Limits, api_key: str | None = None) -> FastAPI:
    """The app for one loaded model. `api_key`: when given, every /v1/ route needs it."""
    limits.check()
    batcher = MicroBatcher(service.run, limits.max_batch, limits.max_wait_ms / 1000, limits.queue_size)
    outcomes = Counter()  # /v1/predict answers by status code

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        log.info("model %s ready: tasks %s; batches of at most %d texts, %.1f ms wait, queue %d texts%s",
                 service.predictor.dir, ", ".join(service.tasks), limits.max_batch, limits.max_wait_ms,
                 limits.queue_size, "; API key required" if api_key else "")
        yield
        log.info("shutting down: answering %d queued texts first", batcher.queued)
        await batcher.close()
        log.info("batcher stopped after %d batches (%d texts)", batcher.stats.batches, batcher.stats.items)

    app = FastAPI(title="tunelab", summary="Predictions from a tunelab model folder: NER, classification, "
                  "generation.", version=_version(), lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return _error(e)

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request, e):
        return _error(_too_large(limits.max_body_bytes))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):  # unknown route, wrong method
        return _error(ApiError(e.status_code, str(e.detail), None, getattr(e, "headers", None)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        return _error(ApiError(422, err["msg"], ".".join(map(str, err["loc"])) or None))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        # Starlette re-raises after this answer, and uvicorn logs the traceback; the client sees none of it.
        return _error(ApiError(500, "internal error; the server log has the details"))

    errors = {code: {"model": ErrorBody} for code in (400, 413, 415, 422, 503)}
    if api_key:
        errors[401] = {"model": ErrorBody}
    v1 = [Depends(_key_check(api_key))] if api_key else []

    @app.get("/health", summary="Liveness: the process answers")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="Readiness: the model takes requests", responses={503: {"model": ErrorBody}})
    async def ready():
        if not batcher.accepting:
            raise ApiError(503, "not ready: starting or shutting down", headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"ready": True}

    @app.get("/v1/model", summary="The model: tasks, labels, base model, adapters, limits", dependencies=v1,
             responses={401: errors[401]} if api_key else None)
    async def model_info():
        return service.describe() | {"limits": asdict(limits)}

    @app.post("/v1/predict", summary="Predict for a list of texts", dependencies=v1,
              response_model=PredictResponse, responses=errors,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": request_schema(limits)}}}})
    async def predict(request: Request):
        try:
            req = parse_predict(await request.body(), request.headers.get("content-type"), service, limits)
            try:
                results = await batcher.submit(req.route, req.texts)
            except Overloaded as e:
                raise ApiError(503, str(e), headers={"Retry-After": str(RETRY_AFTER_S)}) from None
            except BatchFailed:
                raise ApiError(500, "the model failed on this request; the server log has the details") from None
        except ApiError as e:
            outcomes[e.status] += 1
            raise
        if req.top_k:
            for rec in results:
                best = sorted(rec["probabilities"].items(), key=lambda kv: -kv[1])[: req.top_k]
                rec["top_k"] = [{"label": label, "score": p} for label, p in best]
        outcomes[200] += 1
        # Returned as is: the records are already JSON-ready, and re-validating them would cost time per text.
        return JSONResponse({"task": req.task, "kind": req.kind, "results": results})

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(_prometheus(batcher, outcomes), media_type="text/plain; version=0.0.4")

    return app


def _key_check(api_key: str):
    key = api_key.encode("utf-8")
    bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer KEY")
    header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: KEY")

    async def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
                    given: str | None = Depends(header)):
        if given is None and credentials is not None:
            given = credentials.credentials
        # Header values arrive decoded as latin-1: encoding back gives the bytes that were sent.
        if given is None or not hmac.compare_digest(given.encode("latin-1", "replace"), key):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY",
                           headers={"WWW-Authenticate": "Bearer"})

    return check


def _prometheus(batcher: MicroBatcher, outcomes: Counter) -> str:
    s = batcher.stats
    lines = ["# HELP tunelab_predict_requests_total /v1/predict requests by response status.",
             "# TYPE tunelab_predict_requests_total counter"]
    lines += [f'tunelab_predict_requests_total{{status="{code}"}} {n}' for code, n in sorted(outcomes.items())]
    lines += ["# HELP tunelab_batch_size Texts per forward pass.", "# TYPE tunelab_batch_size histogram"]
    for b in BATCH_BUCKETS:
        lines.append(f'tunelab_batch_size_bucket{{le="{b}"}} {sum(n for size, n in s.sizes.items() if size <= b)}')
    lines += [f'tunelab_batch_size_bucket{{le="+Inf"}} {s.batches}', f"tunelab_batch_size_sum {s.items}",
              f"tunelab_batch_size_count {s.batches}",
              "# HELP tunelab_batch_size_max The largest batch so far.", "# TYPE tunelab_batch_size_max gauge",
              f"tunelab_batch_size_max {max(s.sizes, default=0)}",
              "# HELP tunelab_model_busy_seconds_total Time spent in forward passes.",
              "# TYPE tunelab_model_busy_seconds_total counter", f"tunelab_model_busy_seconds_total {s.busy_s:.6f}",
              "# HELP tunelab_queue_texts Texts waiting for a forward pass.", "# TYPE tunelab_queue_texts gauge",
              f"tunelab_queue_texts {batcher.queued}",
              "# HELP tunelab_rejected_total Requests refused with 503: no room in the queue.",
              "# TYPE tunelab_rejected_total counter", f"tunelab_rejected_total {s.rejected}",
              "# HELP tunelab_failed_total Requests whose texts made the model raise.",
              "# TYPE tunelab_failed_total counter", f"tunelab_failed_total {s.failed}"]
    return "\n".join(lines) + "\n"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tunelab")
    except PackageNotFoundError:
        return "0"
