"""Dynamic batching in the service (serve/batcher.py) and its metrics at /metrics: requests that arrive together
share one model call, each gets its own rows back in order, a bad image or a failing call stays with its own
request, deadlines and cancellation drop jobs before they reach the model, heavy uploads decode on half the
workers at most."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest_service import (  # noqa: F401
    encode,
    make_checkpoint,
    one_thread,
    pil_limit_restored,
    random_images,
    running_server,
)
from fakeprint.engine.predict import Predictions
from fakeprint.interfaces.serve import Limits, build_service, create_app
from fakeprint.interfaces.serve import app as app_mod
from fakeprint.interfaces.serve.batcher import Batcher, BatchPolicy, DeadlineExceeded

CLASSES = ["0", "1", "2", "3", "4"]


def marked(*marks: int) -> np.ndarray:
    """One 100x100 image per mark, every pixel of it the mark's value."""
    return np.stack([np.full((100, 100, 3), m, np.uint8) for m in marks])


class FakeModel:
    """``predict`` labels each image with its mark modulo 5 (probabilities one-hot); records every call's marks;
    fails a call that holds the mark 13; ``gate``: calls wait for it."""

    def __init__(self, gate: threading.Event | None = None):
        self.calls: list[list[int]] = []
        self.gate = gate
        self.started = threading.Event()

    def predict(self, images: np.ndarray) -> Predictions:
        marks = [int(im[0, 0, 0]) for im in images]
        self.calls.append(marks)
        self.started.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        if 13 in marks:
            raise RuntimeError("the model cannot take mark 13")
        labels = np.array([m % 5 for m in marks])
        return Predictions(labels, np.eye(5, dtype=np.float32)[labels], CLASSES, None)


def run(coro):
    return asyncio.run(coro)


def gated(policy: BatchPolicy) -> tuple[threading.Event, FakeModel, Batcher]:
    """A batcher over a fake model whose calls wait until the returned gate is set."""
    gate = threading.Event()
    model = FakeModel(gate)
    return gate, model, Batcher(model.predict, policy)


async def busy_with_first(batcher: Batcher, model: FakeModel) -> asyncio.Future:
    """Submit job 1 and return once the model is running it (held there by its gate)."""
    first = asyncio.ensure_future(batcher.submit(marked(1)))
    await asyncio.to_thread(model.started.wait, 5)
    return first


def test_requests_that_arrive_together_share_one_call_and_get_their_own_rows_in_order():
    model = FakeModel()
    batcher = Batcher(model.predict, BatchPolicy(max_batch=64, max_wait_ms=50))

    async def main():
        jobs = [batcher.submit(marked(*range(10 * i, 10 * i + 3))) for i in range(5)]
        out = await asyncio.gather(*jobs)
        await batcher.close()
        return out

    results = run(main())
    assert len(model.calls) == 1 and len(model.calls[0]) == 15
    for i, res in enumerate(results):
        assert [int(v) for v in res.predictions.labels] == [m % 5 for m in range(10 * i, 10 * i + 3)]
        assert res.batch_images == 15 and res.batch_requests == 5


def test_a_call_never_holds_more_than_max_batch_images_and_jobs_keep_their_order():
    model = FakeModel()
    batcher = Batcher(model.predict, BatchPolicy(max_batch=4, max_wait_ms=50, model_calls=1))

    async def main():
        sizes = [3, 2, 6, 1, 1]  # the 6 runs alone: a job is never split
        out = await asyncio.gather(*[batcher.submit(marked(*[i] * n)) for i, n in enumerate(sizes)])
        await batcher.close()
        return out

    results = run(main())
    assert [sorted(set(c)) for c in model.calls] == [[0], [1], [2], [3, 4]]
    assert all(len(c) <= 4 for c in model.calls if set(c) != {2})
    assert [len(r.predictions) for r in results] == [3, 2, 6, 1, 1]


def test_a_failing_call_is_retried_job_by_job_so_only_the_bad_job_fails():
    model = FakeModel()
    batcher = Batcher(model.predict, BatchPolicy(max_batch=64, max_wait_ms=50))

    async def main():
        out = await asyncio.gather(batcher.submit(marked(1, 2)), batcher.submit(marked(13)), batcher.submit(marked(3)),
                                   return_exceptions=True)
        await batcher.close()
        return out

    good1, bad, good2 = run(main())
    assert isinstance(bad, RuntimeError) and "13" in str(bad)
    assert list(good1.predictions.labels) == [1, 2] and list(good2.predictions.labels) == [3]
    assert model.calls[0] == [1, 2, 13, 3] and [1, 2] in model.calls and [3] in model.calls
    assert batcher.metrics.batch_failures._value.get() == 2  # the batch, then the bad job alone


def test_a_job_past_its_deadline_is_refused_without_running():
    gate, model, batcher = gated(BatchPolicy(max_batch=1, max_wait_ms=0, deadline_s=0.2, model_calls=1))

    async def main():
        first = await busy_with_first(batcher, model)
        late = asyncio.ensure_future(batcher.submit(marked(2)))
        await asyncio.sleep(0.4)  # the second job's deadline passes while it waits
        gate.set()
        out = await asyncio.gather(first, late, return_exceptions=True)
        await batcher.close()
        return out

    first, late = run(main())
    assert list(first.predictions.labels) == [1]
    assert isinstance(late, DeadlineExceeded) and "deadline" in str(late)
    assert model.calls == [[1]]


def test_a_cancelled_request_never_reaches_the_model():
    gate, model, batcher = gated(BatchPolicy(max_batch=1, max_wait_ms=0, model_calls=1))

    async def main():
        first = await busy_with_first(batcher, model)
        gone = asyncio.ensure_future(batcher.submit(marked(2)))
        kept = asyncio.ensure_future(batcher.submit(marked(3)))
        await asyncio.sleep(0.05)
        gone.cancel()  # its client went away while it waited
        gate.set()
        out = await asyncio.gather(first, kept)
        await batcher.close()
        return out, gone.cancelled()

    (first, kept), cancelled = run(main())
    assert cancelled and model.calls == [[1], [3]]
    assert list(kept.predictions.labels) == [3]


def test_with_two_model_calls_the_next_batch_starts_while_the_first_runs_and_batches_keep_arrival_order():
    gate, model, batcher = gated(BatchPolicy(max_batch=3, max_wait_ms=0, model_calls=2))

    async def main():
        first = await busy_with_first(batcher, model)  # the first call holds its worker until the gate opens
        rest = [asyncio.ensure_future(batcher.submit(marked(m))) for m in range(2, 9)]
        for _ in range(200):  # the second call starts without waiting for the first
            if len(model.calls) == 2:
                break
            await asyncio.sleep(0.01)
        started_before_gate = [list(c) for c in model.calls]
        gate.set()
        out = await asyncio.gather(first, *rest)
        await batcher.close()
        return started_before_gate, out

    started, out = run(main())
    assert started == [[1], [2, 3, 4]]  # at most two calls at once; the second took the oldest jobs that fit
    assert [int(r.predictions.labels[0]) for r in out] == [m % 5 for m in range(1, 9)]
    marks = sorted(m for c in model.calls for m in c)
    assert marks == list(range(1, 9)) and all(c == sorted(c) and len(c) <= 3 for c in model.calls)
    assert all(c == list(range(c[0], c[0] + len(c))) for c in model.calls)  # each call: consecutive arrivals


def test_a_lone_request_waits_at_most_max_wait():
    model = FakeModel()
    batcher = Batcher(model.predict, BatchPolicy(max_batch=64, max_wait_ms=30))

    async def main():
        t = time.perf_counter()
        res = await batcher.submit(marked(4))
        waited = time.perf_counter() - t
        await batcher.close()
        return res, waited

    res, waited = run(main())
    assert list(res.predictions.labels) == [4] and 0.025 <= waited < 1.0


# ------------------------------------------------------------------------------------------------ the app

@pytest.fixture()
def service(tmp_path):
    return build_service(make_checkpoint(tmp_path), cam=False)


def recording(service, delay: float = 0.0):
    """Wrap the service's model: every call's batch size is recorded; the first call sleeps ``delay``."""
    inner, calls = service.classifier.predict, []

    def predict(images, *a, **kw):
        calls.append(len(images))
        if delay and len(calls) == 1:
            time.sleep(delay)
        return inner(images, *a, **kw)

    service.classifier.predict = predict
    return calls


def post(url: str, *blobs: bytes) -> httpx.Response:
    files = [("files", (f"{i}.png", b, "image/png")) for i, b in enumerate(blobs)]
    return httpx.post(url + "/v1/predict", files=files, timeout=30)


def test_concurrent_http_requests_share_model_calls_and_match_one_by_one_answers(service):
    images = random_images(8, seed=3)
    alone = service.classifier.predict(images)  # before the wrapper: what each image gets by itself
    calls = recording(service, delay=0.5)
    app = create_app(service, batching=BatchPolicy(max_batch=64, max_wait_ms=20))
    with running_server(app) as url:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: post(url, encode(images[i])), range(8)))
        metrics = httpx.get(url + "/metrics", timeout=10)
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
    assert len(calls) < 8 and sum(calls) == 8  # the requests that queued behind the first call shared one
    for i, r in enumerate(answers):
        got = r.json()["results"][0]
        assert got["label_index"] == int(alone.labels[i])
        assert np.allclose(list(got["probabilities"].values()), alone.probs[i], atol=1e-5)
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    assert 'fakeprint_http_requests_total{path="/v1/predict",status="200"} 8.0' in text
    assert f"fakeprint_batch_images_count {float(len(calls))}" in text
    assert "fakeprint_batch_images_sum 8.0" in text and "fakeprint_batch_queue_depth 0.0" in text
    assert "fakeprint_images_classified_total 8.0" in text


def test_a_bad_image_fails_only_its_own_request_beside_a_shared_call(service):
    calls = recording(service, delay=0.5)
    app = create_app(service, batching=BatchPolicy(max_batch=64, max_wait_ms=20))
    good = encode(random_images(1, seed=5)[0])
    with running_server(app) as url, ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post, url, good) for _ in range(5)]
        bad = pool.submit(post, url, b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).result()
        answers = [f.result() for f in futures]
    assert bad.status_code in (415, 422) and bad.json()["error"] in ("not_an_image", "corrupt_image")
    assert all(r.status_code == 200 for r in answers) and sum(calls) == 5


def test_a_request_past_its_deadline_gets_503_with_retry_after(service):
    recording(service, delay=1.0)
    app = create_app(service, batching=BatchPolicy(max_batch=1, max_wait_ms=0, deadline_s=0.3, model_calls=1))
    blob = encode(random_images(1)[0])
    with running_server(app) as url:
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, url, blob)
            time.sleep(0.3)  # the first request holds the model for a second
            late = pool.submit(post, url, blob).result()
            assert first.result().status_code == 200
        text = httpx.get(url + "/metrics", timeout=10).text
    assert late.status_code == 503 and late.json()["error"] == "deadline_exceeded"
    assert late.headers["retry-after"] == "1"
    assert 'fakeprint_refused_requests_total{reason="deadline_exceeded"} 1.0' in text


def test_heavy_uploads_decode_on_half_the_workers_and_light_ones_on_all(service, monkeypatch):
    inner, live, peak, lock = app_mod.decode_upload, [0], [0], threading.Lock()

    def slow_decode(*a, **kw):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.3)
        try:
            return inner(*a, **kw)
        finally:
            with lock:
                live[0] -= 1

    monkeypatch.setattr(app_mod, "decode_upload", slow_decode)
    small, big = encode(random_images(1)[0]), encode(random_images(1, size=300)[0])
    app = create_app(service, Limits(heavy_pixels=50_000), workers=2)
    with running_server(app) as url:
        for blob, expected in ((big, 1), (small, 2)):
            peak[0] = 0
            with ThreadPoolExecutor(4) as pool:
                assert all(r.status_code == 200 for r in pool.map(post, [url] * 4, [blob] * 4))
            assert peak[0] == expected


def test_metrics_need_the_token_like_the_api_and_unknown_paths_are_one_series(service):
    token = "t0k3n-" + "abcdefghijklmnopqrstuvwxyz0123456789"
    with TestClient(create_app(service, token=token)) as c:
        assert c.get("/metrics").status_code == 401
        for path in ("/nope", "/nope/2", "/x?y=1"):
            c.get(path, headers={"Authorization": f"Bearer {token}"})
        r = c.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    assert 'fakeprint_http_requests_total{path="other",status="404"} 3.0' in r.text
    assert 'path="/nope"' not in r.text


def test_model_info_says_how_requests_are_batched(service):
    with TestClient(create_app(service, batching=BatchPolicy(max_batch=16, max_wait_ms=3, deadline_s=9))) as c:
        info = c.get("/v1/model").json()
    assert info["batching"] == {"max_batch": 16, "max_wait_ms": 3, "deadline_s": 9, "model_calls": 1}
    assert info["limits"]["heavy_pixels"] == Limits().heavy_pixels


@pytest.mark.parametrize("flag,value", [("--max-batch", "0"), ("--max-wait-ms", "-1"), ("--deadline", "0"),
                                        ("--threads", "0"), ("--model-calls", "0")])
def test_serve_refuses_bad_batching_options(flag, value, capsys):
    from fakeprint.interfaces.cli import main

    assert main(["serve", flag, value]) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_the_shipped_models_answer_the_same_when_called_from_two_threads_at_once():
    """What ``model_calls`` 2 does to a classifier: two predictions in flight in two threads (the routed model
    shares statistics between its detector and members in thread-local state)."""
    from fakeprint.engine.predict import load

    clf = load("routed")
    images = [random_images(6, seed=s) for s in (11, 12)]
    alone = [clf.predict(im) for im in images]
    barrier = threading.Barrier(2)

    def together(im):
        barrier.wait(10)
        return [clf.predict(im) for _ in range(3)]

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(together, images))
    for want, got in zip(alone, both, strict=True):
        for pred in got:
            assert np.array_equal(pred.labels, want.labels)
            assert np.allclose(pred.probs, want.probs, atol=1e-6)
            assert np.array_equal(pred.uncertain, want.uncertain)
            assert np.allclose(pred.file_perturbed, want.file_perturbed, atol=1e-6)
