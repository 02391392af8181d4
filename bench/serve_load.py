"""HTTP load on loopback: `tunelab serve` against a plain transformers pipeline behind a minimal server, the
same CoNLL-2003 NER model (all-MiniLM-L6-v2 fine-tuned by tunelab) and the same sentences.

  tunelab  `python -m tunelab serve MODEL --threads T --no-access-log` (micro-batching with its defaults unless
           --serve-arg says otherwise); a request is POST /v1/predict {"texts": [sentence]}
  anchor   pipeline("token-classification", aggregation_strategy="simple") on the same folder, behind FastAPI
           on uvicorn (access log off too): POST /predict {"text": sentence}, one request = one pipeline call,
           no batching. The endpoint is `async def` and calls the pipeline directly, one call at a time on the
           event loop's thread: the faster of the two minimal servers, so the goal is checked against it.
  anchor_threads  the same with a plain `def` endpoint (FastAPI runs it on its thread pool, as tutorials
           write it) holding a lock, since a pipeline and its fast tokenizer are not safe to call from several
           threads at once; slower under concurrency (each call lands on another pool thread).

  tunelab_int8  tunelab serve --quantize int8 (dynamic int8 Linear layers); with it the bench also scores the
           float32 and the int8 model on the whole CoNLL-2003 test split (entity F1, in the parent process before
           any server starts)

--bf16 runs every server under bf16 autocast (tunelab serve --bf16; torch.autocast around the pipeline call),
as tunelab's recipes train and evaluate; without it everything is float32.

Both servers run in their own process with the same torch threads (torch.set_num_threads and OMP_NUM_THREADS).
The client is a separate process: asyncio with a small HTTP/1.1 keep-alive client of its own (a few lines
over asyncio streams; much less CPU per request than a full client library, which matters on 2 cores where
client and server share the machine). At each concurrency (1, 8, 32 clients) it sends a bounded number of
requests, one CoNLL-2003 test sentence (words joined by spaces) each, cycling through the test set; every
client sends its next request when the previous answer has arrived. A request fails unless it gets a 200 with
a JSON body holding one result. Latency is from the first byte sent to the last byte of the answer.

    .venv/bin/python bench/serve_load.py --out bench/results/serve_load.json

Without --model it trains a quick model once (runs/serve_bench_ner; reused when present):
    tunelab train recipes/conll2003_quick.yaml train.epochs=1 data.max_train_examples=2000 output_dir=runs/serve_bench_ner
Smoke test: --requests 40 --concurrency 1 8
"""

import argparse
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from ner_vs_trainer import fmt  # noqa: E402
from peft_conll import host_info  # noqa: E402

SERVERS = ("tunelab", "anchor", "anchor_threads", "tunelab_int8")
OURS = ("tunelab", "tunelab_int8")  # tunelab serve (its API), float32 or --quantize int8
BASELINE = "anchor"
DEFAULT_MODEL = ROOT / "runs" / "serve_bench_ner"
TRAIN = ["recipes/conll2003_quick.yaml", "train.epochs=1", "data.max_train_examples=2000",
         f"output_dir={DEFAULT_MODEL.relative_to(ROOT)}"]
GOAL = ("at 32 concurrent clients, tunelab serve answers at least 3x the anchor's requests/s with a lower p99 "
        "latency, and no request fails")


# ----------------------------------------------------------------------------------------------------------
# The anchor server (its own process)


def anchor_app(model: str, threads: int, on_loop: bool, bf16: bool):
    import contextlib
    import threading

    import torch
    from fastapi import FastAPI
    from pydantic import BaseModel
    from transformers import pipeline

    torch.set_num_threads(threads)
    nlp = pipeline("token-classification", model=model, tokenizer=model, aggregation_strategy="simple",
                   device=-1)
    lock = threading.Lock()
    app = FastAPI()

    class Body(BaseModel):
        text: str

    @app.get("/health")
    def health():
        return {"status": "ok"}

    def entities(text: str) -> dict:
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            found = nlp(text)
        return {"entities": [{"type": e["entity_group"], "score": float(e["score"]), "text": e["word"],
                              "start": int(e["start"]), "end": int(e["end"])} for e in found]}

    if on_loop:
        @app.post("/predict")
        async def predict(body: Body):
            return entities(body.text)
    else:
        @app.post("/predict")
        def predict_on_pool(body: Body):
            with lock:
                return entities(body.text)

    return app


def run_anchor(args) -> None:
    import uvicorn

    uvicorn.run(anchor_app(args.model, args.threads, args.anchor_server == "anchor", args.bf16), host="127.0.0.1",
                port=args.port, log_level="warning", access_log=False)


# ----------------------------------------------------------------------------------------------------------
# The client (its own process)


class Connection:
    """One HTTP/1.1 keep-alive connection: POST a JSON body, read the status and a Content-Length body."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader = self.writer = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readuntil(b"\r\n")
        status = int(status_line.split()[1])
        length, close = None, False
        while True:
            line = await self.reader.readuntil(b"\r\n")
            if line == b"\r\n":
                break
            name, _, value = line.decode("latin-1").partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
            elif name == "transfer-encoding":
                raise RuntimeError("chunked answers are not expected from either server")
        data = await self.reader.readexactly(length or 0)
        if close:
            self.close()
        return status, data

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def load(url: str, server: str, sentences: list[str], concurrency: int, requests: int, offset: int) -> dict:
    host, port = url.removeprefix("http://").split(":")
    path = "/v1/predict" if server in OURS else "/predict"
    bodies = [json.dumps({"texts": [s]} if server in OURS else {"text": s}).encode() for s in sentences]
    latencies, failures, entities = [], [], 0
    counter = iter(range(requests))

    async def client():
        nonlocal entities
        conn = Connection(host, int(port))
        for i in counter:
            body = bodies[(offset + i) % len(bodies)]
            t0 = time.perf_counter()
            try:
                status, data = await conn.post(path, body)
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    failures.append(f"HTTP {status}: {data[:200]!r}")
                    continue
                answer = json.loads(data)
                found = answer["results"][0]["entities"] if server in OURS else answer["entities"]
                if server in OURS and len(answer["results"]) != 1:
                    raise ValueError(f"{len(answer['results'])} results for one text")
                entities += len(found)
            except Exception as e:  # noqa: BLE001 -- every kind of failure is counted, none stops the run
                latencies.append(time.perf_counter() - t0)
                failures.append(f"{type(e).__name__}: {e}")
                conn.close()
        conn.close()

    c0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": requests, "failed": len(failures), "wall_s": wall,
            "latencies_s": latencies, "entities": entities, "client_cpu_s": time.process_time() - c0,
            "failures_sample": failures[:5]}


def run_client(args) -> None:
    sentences = json.loads(Path(args.sentences).read_text(encoding="utf-8"))
    result = asyncio.run(load(args.url, args.server, sentences, args.concurrency[0], args.requests, args.offset))
    Path(args.client_out).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------------------
# Parent: model, sentences, one server process at a time, one client process per concurrency level


def ensure_model(args) -> Path:
    if args.model:
        return Path(args.model)
    if (DEFAULT_MODEL / "tunelab.json").is_file():
        return DEFAULT_MODEL
    print(f"training the benchmark model: tunelab train {' '.join(TRAIN)}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "tunelab", "train", *TRAIN, f"train.threads={args.threads}"],
                   cwd=ROOT, env=env(args), check=True)
    return DEFAULT_MODEL


def test_sentences() -> list[str]:
    from tunelab.data.packaged import conll2003

    return [" ".join(s.words) for s in conll2003().test]


def env(args) -> dict:
    e = dict(os.environ)
    n = str(args.threads)
    e.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
             TOKENIZERS_PARALLELISM="false")
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(server: str, model: Path, args, log) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if server in OURS:
        cmd = [sys.executable, "-m", "tunelab", "serve", str(model), "--port", str(port), "--threads",
               str(args.threads), "--device", "cpu", "--no-access-log", *(["--bf16"] if args.bf16 else []),
               *(["--quantize", "int8"] if server == "tunelab_int8" else []), *args.serve_arg]
    else:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--anchor-server", server, "--model", str(model),
               "--port", str(port), "--threads", str(args.threads), *(["--bf16"] if args.bf16 else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(args), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    import urllib.request

    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the {server} server exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(url + ("/ready" if server in OURS else "/health"), timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the {server} server did not become ready in 300 s; see {log.name}")
        time.sleep(0.2)


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch_metrics(url: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        for name in ("tunelab_batch_size_sum", "tunelab_batch_size_count", "tunelab_model_busy_seconds_total"):
            if line.startswith(name + " "):
                out[name] = float(line.split()[1])
    return out


def client(server: str, url: str, sentences_file: str, concurrency: int, requests: int, offset: int, args) -> dict:
    fd, out = tempfile.mkstemp(prefix="serve_load_client_", suffix=".json")
    os.close(fd)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "--server", server, "--url", url,
           "--sentences", sentences_file, "--concurrency", str(concurrency), "--requests", str(requests),
           "--offset", str(offset), "--client-out", out]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(args))
    _, status, usage = os.wait4(proc.pid, 0)
    try:
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"the client exited with {os.waitstatus_to_exitcode(status)}")
        result = json.loads(Path(out).read_text())
    finally:
        Path(out).unlink(missing_ok=True)
    result["client_process_cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q % of the values at or below it."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def measure(server: str, model: Path, sentences_file: str, n_sentences: int, args, log) -> dict:
    print(f"\n=== {server} ===", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc, url = start(server, model, args, log)
    row = {"server": server, "startup_s": time.perf_counter() - t0, "levels": []}
    try:
        # Warm-up (not counted): every code path once, at the largest concurrency.
        client(server, url, sentences_file, max(args.concurrency), args.warmup, n_sentences // 2, args)
        for level, c in enumerate(args.concurrency):
            before = batch_metrics(url) if server in OURS else {}
            cpu0 = process_cpu_s(proc.pid)
            r = client(server, url, sentences_file, c, args.requests, 0, args)
            cpu = process_cpu_s(proc.pid) - cpu0
            lat = r.pop("latencies_s")
            entry = {**r, "requests_per_s": r["requests"] / r["wall_s"], "p50_ms": 1000 * percentile(lat, 50),
                     "p99_ms": 1000 * percentile(lat, 99), "mean_ms": 1000 * sum(lat) / len(lat),
                     "max_ms": 1000 * max(lat), "server_cpu_s": cpu, "server_cpu_per_wall": cpu / r["wall_s"]}
            if server in OURS:
                after = batch_metrics(url)
                batches = after["tunelab_batch_size_count"] - before["tunelab_batch_size_count"]
                entry["mean_batch"] = (after["tunelab_batch_size_sum"] - before["tunelab_batch_size_sum"]) / batches
                entry["model_busy_share"] = (after["tunelab_model_busy_seconds_total"]
                                             - before["tunelab_model_busy_seconds_total"]) / r["wall_s"]
            print(f"{server} c={c}: {entry['requests_per_s']:.1f} req/s, p50 {entry['p50_ms']:.1f} ms, "
                  f"p99 {entry['p99_ms']:.1f} ms, failed {entry['failed']}", file=sys.stderr, flush=True)
            row["levels"].append(entry)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return row


def int8_accuracy(model: Path, threads: int) -> dict:
    """Entity F1 on the whole CoNLL-2003 test split of the float32 model and of its int8 version (as
    `tunelab serve --quantize int8` loads it), each from the same folder and predictions path."""
    import torch

    from tunelab.data.packaged import conll2003
    from tunelab.predict import Predictor

    torch.set_num_threads(threads)
    test = conll2003().test
    out = {}
    for name, kind in (("float32", None), ("int8", "int8")):
        pred = Predictor(model, device="cpu", quantize=kind)
        t0 = time.perf_counter()
        metrics = pred.evaluate(test)
        out[name] = {"f1": metrics["main"], "seconds": time.perf_counter() - t0,
                     "check": pred.quantized and next(iter(pred.quantized.values()))}
    out["delta_f1_points"] = 100 * (out["int8"]["f1"] - out["float32"]["f1"])
    return out


def level(rows: list[dict], server: str, c: int) -> dict | None:
    row = next((r for r in rows if r["server"] == server and "error" not in r), None)
    return next((e for e in row["levels"] if e["concurrency"] == c), None) if row else None


def table(rows: list[dict]) -> str:
    out = ["| server | clients | requests | failed | requests/s | × anchor | p50 ms | p99 ms | p99 × anchor "
           "| mean batch | server CPU s/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['server']} | failed: {r['error'][:160]} |" + " |" * 9)
            continue
        for e in r["levels"]:
            base = level(rows, BASELINE, e["concurrency"])
            x = e["requests_per_s"] / base["requests_per_s"] if base else None
            p = e["p99_ms"] / base["p99_ms"] if base else None
            out.append(f"| {r['server']} | {e['concurrency']} | {e['requests']:,} | {e['failed']} "
                       f"| {e['requests_per_s']:,.1f} | {fmt(x, '.2f')}× | {e['p50_ms']:.1f} | {e['p99_ms']:.1f} "
                       f"| {fmt(p, '.2f')}× | {fmt(e.get('mean_batch'), '.1f')} | {e['server_cpu_per_wall']:.2f} |")
    return "\n".join(out)


def goal_check(rows: list[dict], top: int) -> dict:
    ours, base = level(rows, "tunelab", top), level(rows, BASELINE, top)
    if not ours or not base:
        return {"checked": False, "why": f"needs both servers measured at {top} clients"}
    ours_row = next(r for r in rows if r["server"] == "tunelab")
    failed = sum(e["failed"] for e in ours_row["levels"])
    checks = {
        "throughput_3x": {"met": ours["requests_per_s"] >= 3 * base["requests_per_s"],
                          "ratio": ours["requests_per_s"] / base["requests_per_s"]},
        "lower_p99": {"met": ours["p99_ms"] < base["p99_ms"], "tunelab_p99_ms": ours["p99_ms"],
                      "anchor_p99_ms": base["p99_ms"]},
        "no_failed_requests": {"met": failed == 0, "tunelab_failed": failed},
    }
    return {"checked": True, "clients": top, **checks, "all_met": all(c["met"] for c in checks.values())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a tunelab NER folder (default: train runs/serve_bench_ner once)")
    p.add_argument("--threads", type=int, default=2, help="torch threads in each server")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=1500, help="requests per concurrency level")
    p.add_argument("--warmup", type=int, default=100, help="requests sent before measuring (not counted)")
    p.add_argument("--servers", default=",".join(SERVERS), help="comma-separated, in order")
    p.add_argument("--serve-arg", action="append", default=[],
                   help="one more argument for tunelab serve (repeatable), e.g. --serve-arg=--max-wait-ms=2")
    p.add_argument("--out", default="bench/results/serve_load.json")
    # internal: the anchor server and the client, each in its own process
    p.add_argument("--bf16", action="store_true", help="bf16 autocast in every server (default: float32)")
    p.add_argument("--anchor-server", choices=SERVERS[1:], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server", choices=SERVERS, help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--sentences", help=argparse.SUPPRESS)
    p.add_argument("--offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--client-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.anchor_server:
        run_anchor(args)
        return 0
    if args.client:
        run_client(args)
        return 0

    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or any(s not in SERVERS for s in servers):
        p.error(f"--servers: choose from {', '.join(SERVERS)}")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    model = ensure_model(args)
    sentences = test_sentences()
    fd, sentences_file = tempfile.mkstemp(prefix="serve_load_sentences_", suffix=".json")
    os.close(fd)
    Path(sentences_file).write_text(json.dumps(sentences, ensure_ascii=False), encoding="utf-8")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    accuracy = int8_accuracy(model, args.threads) if "tunelab_int8" in servers else None
    rows = []
    try:
        for server in servers:
            log_path = out.with_name(f"{out.stem}_{server}.log")
            with open(log_path, "wb") as log:
                try:
                    rows.append(measure(server, model, sentences_file, len(sentences), args, log))
                except Exception as e:  # noqa: BLE001 -- one server failing still reports the other
                    rows.append({"server": server, "error": f"{type(e).__name__}: {e}"})
    finally:
        Path(sentences_file).unlink(missing_ok=True)

    top = max(args.concurrency)
    goal = goal_check(rows, top)
    words = sum(len(s.split()) for s in sentences) / len(sentences)
    doc = {"benchmark": "tunelab serve vs a plain transformers pipeline behind a minimal FastAPI server, "
                        "CoNLL-2003 NER, loopback HTTP load",
           "started": started, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "model": str(model), "args": {k: v for k, v in vars(args).items()
                                         if k not in ("anchor_server", "port", "client", "server", "url",
                                                      "sentences", "offset", "client_out")},
           "sentences": {"source": "CoNLL-2003 test, words joined by spaces", "count": len(sentences),
                         "mean_words": words},
           "host": host_info(), "baseline": BASELINE, "goal": GOAL, "goal_check": goal, "int8_accuracy": accuracy,
           "runs": rows}
    from tunelab.io import atomic_write_json

    atomic_write_json(out, doc)
    print(f"\nNER model {model}; {len(sentences)} CoNLL-2003 test sentences ({words:.1f} words on average), "
          f"{args.requests} requests per level, {args.threads} torch threads per server\n")
    print(table(rows))
    if goal["checked"]:
        print(f"\nGoal ({GOAL}): {'met' if goal['all_met'] else 'NOT met'} -- throughput "
              f"{goal['throughput_3x']['ratio']:.2f}x the anchor, p99 {goal['lower_p99']['tunelab_p99_ms']:.1f} "
              f"vs {goal['lower_p99']['anchor_p99_ms']:.1f} ms, {goal['no_failed_requests']['tunelab_failed']} "
              "failed tunelab requests")
    if accuracy:
        f, q = accuracy["float32"], accuracy["int8"]
        print(f"\nCoNLL-2003 test entity F1: float32 {100 * f['f1']:.2f}, int8 {100 * q['f1']:.2f} "
              f"({accuracy['delta_f1_points']:+.2f} points); evaluation {f['seconds']:.1f} s vs {q['seconds']:.1f} s")
    print(f"\nwrote {out}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
