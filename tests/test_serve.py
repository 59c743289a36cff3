"""``fmstore serve`` (fmstore.integrations.serve): a real uvicorn on loopback, talked to over HTTP
with the standard library.  A tiny train.py run makes the snapshots; new steps are committed
while the server runs (the model part, perturbed, as a training job's next commit would be)."""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import free_port, shard_file  # noqa: E402
from fmstore.integrations import serve as srv  # noqa: E402

from fmstore import Checkpointer  # noqa: E402
from fmstore.checkpoint import step_dir  # noqa: E402
from fmstore.cli import main as cli  # noqa: E402

PROMPT = "def main("


@pytest.fixture(scope="module")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A train.py run, tiny: steps 2 and 4 committed (model, optimizer, scheduler, data, RNG)."""
    from fmstore.integrations.train import parse, train

    root = tmp_path_factory.mktemp("serve") / "run"
    threads = torch.get_num_threads()
    try:
        train(
            parse(
                [
                    "--root",
                    str(root),
                    "--steps",
                    "4",
                    "--every",
                    "2",
                    "--corpus-bytes",
                    "65536",
                    "--log-every",
                    "100",
                ]
            )
        )
    finally:
        torch.set_num_threads(threads)  # train() pins one thread for its exactness
    with Checkpointer(root) as ck:
        assert ck.steps() == [2, 4]
    return root


@pytest.fixture
def root(run_root: Path, tmp_path: Path) -> Path:
    """A copy of the run for one test: tests commit and damage steps."""
    import shutil

    dst = tmp_path / "run"
    shutil.copytree(run_root, dst, ignore=shutil.ignore_patterns("writer.lease"))
    return dst


class Running:
    def __init__(self, server: srv.Server, port: int) -> None:
        self.server, self.port = server, port

    def call(self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
             raw: bytes | None = None) -> tuple[int, Any]:  # fmt: skip
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(
                method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
            )
            resp = conn.getresponse()
            text = resp.read()
            return resp.status, json.loads(text) if text else None
        finally:
            conn.close()

    def complete(self, prompt: str = PROMPT, **kw: Any) -> dict[str, Any]:
        status, out = self.call("POST", "/v1/completions", {"prompt": prompt, "max_tokens": 8, **kw})
        assert status == 200, out
        return out


@pytest.fixture
def start(root: Path) -> Iterator[Any]:
    """``start(**serve_kwargs)``: a server on a free loopback port, ready (/health answers)."""
    started: list[tuple[srv.Server, threading.Thread]] = []

    def go(**kw: Any) -> Running:
        port = free_port()
        server = srv.serve(str(root), port=port, log_level="warning", **{"poll": 0.2, **kw})
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        started.append((server, thread))
        running = Running(server, port)
        deadline = time.monotonic() + 20
        while True:
            try:
                if running.call("GET", "/health")[0] == 200:
                    return running
            except OSError:
                pass
            assert time.monotonic() < deadline, "the server did not answer /health"
            time.sleep(0.02)

    yield go
    for server, thread in started:
        server.stop()
        thread.join(timeout=20)
        assert not thread.is_alive()


def commit(root: Path, step: int, seed: int, base: int = 4) -> None:
    """Commit ``step``: step ``base``'s model perturbed, saved as train.py's state keys it."""
    with Checkpointer(root) as ck:
        shapes = {k: list(v.shape) for k, v in ck.manifest(base).tensors.items()}
        model = srv.build_model(shapes)
        ck.load({"model": model}, base, strict=False)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ck.save(step, {"model": model})
        ck.wait()


def greedy(root: Path, step: int, prompt: str = PROMPT, n: int = 8) -> str:
    """The text greedy decoding of ``step``'s weights gives, computed here, one request alone."""
    with Checkpointer(root) as ck:
        shapes = {k: list(v.shape) for k, v in ck.manifest(step).tensors.items()}
    model = srv.build_model(shapes)
    srv._load_weights(str(root), step, model)
    tokens = list(prompt.encode())
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            ctx = (tokens + out)[-model.cfg.seq_len :]
            out.append(int(model(torch.tensor([ctx]))[0, -1].argmax()))
    return bytes(out).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- tests


def test_completion_and_models(start: Any, root: Path) -> None:
    s = start()
    status, models = s.call("GET", "/v1/models")
    assert status == 200
    assert models["data"][0]["id"] == "run@step-4" and models["data"][0]["fmstore_step"] == 4
    out = s.complete(temperature=0)
    assert out["object"] == "text_completion" and out["fmstore_step"] == 4 and out["model"] == "run@step-4"
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["text"] == greedy(root, 4)
    assert out["usage"] == {
        "prompt_tokens": len(PROMPT),
        "completion_tokens": 8,
        "total_tokens": len(PROMPT) + 8,
    }
    sampled = s.complete(temperature=1.5, max_tokens=20)
    assert sampled["usage"]["completion_tokens"] == 20
    # A prompt longer than the model's context (64) is cropped, not refused.
    assert s.complete(prompt="x" * 300)["usage"]["prompt_tokens"] == 300


def test_stream(start: Any, root: Path) -> None:
    s = start()
    conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
    body = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    conn.request(
        "POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type").startswith("text/event-stream")
    events = [line[len(b"data: ") :] for line in resp.read().split(b"\n\n") if line.startswith(b"data: ")]
    conn.close()
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) >= 2 and all(c["fmstore_step"] == 4 for c in chunks)
    assert (
        chunks[-1]["choices"][0]["finish_reason"] == "length"
        and chunks[-1]["usage"]["completion_tokens"] == 8
    )
    assert "".join(c["choices"][0]["text"] for c in chunks) == greedy(root, 4)


def test_follows_training_under_load(start: Any, root: Path) -> None:
    """8 clients send requests without pause while step 6 is committed: the watcher loads it
    beside, swaps it in between batches; no request fails, each is wholly one step's."""
    s = start(max_batch=4)
    expect = {4: greedy(root, 4)}
    stop = threading.Event()
    results: list[tuple[int, str]] = []
    errors: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                status, out = s.call(
                    "POST", "/v1/completions", {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
                )
            except Exception as e:  # noqa: BLE001 - every failure is the test's to report
                errors.append(repr(e))
                continue
            if status != 200:
                errors.append(f"{status} {out}")
                continue
            results.append((out["fmstore_step"], out["choices"][0]["text"]))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while len(results) < 16:
            assert time.monotonic() < deadline and not errors, errors
            time.sleep(0.01)
        commit(root, 6, seed=1)
        expect[6] = greedy(root, 6)
        assert expect[6] != expect[4]  # the steps' answers tell them apart
        seen = len(results)
        while not any(step == 6 for step, _ in results[seen:]) or len(results) < seen + 16:
            assert time.monotonic() < deadline + 10 and not errors, errors
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not errors, errors[:5]
    assert {step for step, _ in results} <= {4, 6}
    # Greedy answers equal to one step's own decoding: no answer mixed two versions.
    bad = [(step, text) for step, text in results if text != expect[step]]
    assert not bad, bad[:5]
    assert s.call("GET", "/health")[1] == {"status": "ok", "step": 6}


def test_update_weights_from_disk(start: Any, root: Path) -> None:
    s = start(poll=0)
    base = {"load_format": None, "abort_all_requests": False, "weight_version": None, "flush_cache": True}
    status, out = s.call("POST", "/update_weights_from_disk", {**base, "model_path": str(root), "step": 2})
    assert status == 200 and out["success"] is True and out["num_paused_requests"] == 0, out
    assert s.complete()["fmstore_step"] == 2
    assert s.call("GET", "/v1/models")[1]["data"][0]["id"] == "run@step-2"
    # A step directory as model_path (SGLang's way of naming a checkpoint).
    status, out = s.call("POST", "/update_weights_from_disk", {**base, "model_path": str(root / step_dir(4))})
    assert out["success"] is True and s.complete(temperature=0)["choices"][0]["text"] == greedy(root, 4)
    # A damaged snapshot: success false, the served weights stay.
    commit(root, 8, seed=2)
    path = shard_file(root / step_dir(8))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # in the tensors' bytes (the header is at the start)
    path.write_bytes(bytes(data))
    status, out = s.call("POST", "/update_weights_from_disk", {**base, "model_path": str(root), "step": 8})
    assert status == 200 and out["success"] is False and "step 8" in out["message"], out
    assert "Corrupt" in out["message"] or "Checksum" in out["message"], out
    assert s.complete()["fmstore_step"] == 4 and s.call("GET", "/health")[1]["step"] == 4
    # Missing step, another root, unsupported format: refused, still serving step 4.
    for body, words in [
        ({**base, "model_path": str(root), "step": 99}, "step 99"),
        ({**base, "model_path": "/elsewhere"}, "neither the served root"),
        ({**base, "model_path": str(root), "load_format": "gguf"}, "load_format"),
    ]:
        status, out = s.call("POST", "/update_weights_from_disk", body)
        assert status == 200 and out["success"] is False and words in out["message"], out
    assert s.complete()["fmstore_step"] == 4


def test_damaged_new_step_is_skipped_by_the_watcher(start: Any, root: Path, tmp_path: Path) -> None:
    """A damaged step appearing under the root (its shard file first, its manifest last, as a
    commit writes them): the watcher's load fails, the old weights stay served."""
    import shutil

    s = start(poll=0.1)
    scratch = tmp_path / "scratch"
    shutil.copytree(root, scratch)
    commit(scratch, 8, seed=2)
    path = shard_file(scratch / step_dir(8))
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    (root / step_dir(8)).mkdir()
    for f in sorted((scratch / step_dir(8)).iterdir(), key=lambda f: f.name == "manifest.json"):
        shutil.copy(f, root / step_dir(8) / f.name)
    deadline = time.monotonic() + 20
    while s.server.service.last_error is None:
        assert time.monotonic() < deadline, "the watcher did not try step 8"
        time.sleep(0.02)
    assert "step 8" in s.server.service.last_error
    assert s.complete()["fmstore_step"] == 4 and s.call("GET", "/health")[1]["step"] == 4
    commit(root, 10, seed=3)  # the next good commit is served
    while s.complete()["fmstore_step"] != 10:
        assert time.monotonic() < deadline, "step 10 was not served"


def test_bad_requests(start: Any) -> None:
    s = start(limits=srv.Limits(max_tokens=32, max_prompt=100))
    cases = [
        ({"prompt": PROMPT, "max_tokens": 33}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "max_tokens": "many"}, "max_tokens"),
        ({"prompt": PROMPT, "temperature": 2.5}, "temperature"),
        ({"prompt": PROMPT, "temperature": -1}, "temperature"),
        ({"max_tokens": 4}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "é" * 51}, "prompt"),  # 102 bytes of UTF-8
    ]
    for body, field in cases:
        status, out = s.call("POST", "/v1/completions", body)
        assert 400 <= status < 500 and out["error"]["param"] == field and field in out["error"]["message"], (
            body,
            out,
        )
    status, out = s.call("POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and out["error"]["param"] == "body"
    status, out = s.call("POST", "/v1/completions", raw=json.dumps({"prompt": "a" * (2 << 20)}).encode())
    assert status == 413 and out["error"]["param"] == "body"
    status, out = s.call("POST", "/update_weights_from_disk", {"model_path": "x", "step": -1})
    assert status == 400 and out["error"]["param"] == "step"
    status, out = s.call("POST", "/update_weights_from_disk", {"step": 2})
    assert status == 400 and out["error"]["param"] == "model_path"
    assert s.complete()["fmstore_step"] == 4  # still serving


def test_token(start: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    s = start(token="s3cret-token")
    assert s.call("GET", "/health")[0] == 200
    for method, path, body in [("GET", "/v1/models", None), ("POST", "/v1/completions", {"prompt": "a"}),
                               ("POST", "/pause_generation", None)]:  # fmt: skip
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}]:
            status, out = s.call(method, path, body, headers)
            assert status == 401 and "s3cret" not in json.dumps(out), (path, headers, out)
    ok = {"Authorization": "Bearer s3cret-token"}
    assert s.call("GET", "/v1/models", headers=ok)[0] == 200
    assert s.call("POST", "/v1/completions", {"prompt": "a", "max_tokens": 2}, ok)[0] == 200


def test_pause_and_continue(start: Any) -> None:
    s = start()
    status, out = s.call("POST", "/pause_generation")
    assert status == 200 and out["success"] is True
    answers: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answers.append(s.complete()))
    waiting.start()
    deadline = time.monotonic() + 10
    while s.server.engine.queued() == 0:  # the request has arrived and waits
        assert time.monotonic() < deadline
        time.sleep(0.01)
    waiting.join(timeout=0.5)
    assert waiting.is_alive() and not answers  # paused: not answered
    assert s.call("GET", "/health")[0] == 200  # the rest still answers
    status, out = s.call("POST", "/continue_generation")
    assert status == 200 and out["success"] is True
    waiting.join(timeout=20)
    assert answers and answers[0]["fmstore_step"] == 4


def test_cli_help_and_missing_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli(["serve", "--help"])
    assert e.value.code == 0 and "--max-batch" in capsys.readouterr().out
    assert cli(["serve", str(tmp_path / "nothing"), "--port", str(free_port())]) == 3  # not found
    assert "no storage root" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()  # serving never creates or writes anything
    (tmp_path / "empty").mkdir()
    assert cli(["serve", str(tmp_path / "empty"), "--port", str(free_port())]) == 3
    assert "no committed snapshot" in capsys.readouterr().err
