"""``fmstore serve`` (fmstore.integrations.serve): a real uvicorn on loopback, talked to over HTTP
with the standard library.  A tiny train.py run makes the snapshots; new steps are committed
while the server runs (the model part, perturbed, as a training job's next commit would be).
A tiny transformers Llama with a tokenizer trained here (offline) is served through
``hf_config=``, and both models through parameter offload (``gpu_budget=``) on the CPU."""

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

    def go(at: Path | None = None, **kw: Any) -> Running:
        port = free_port()
        server = srv.serve(str(at or root), port=port, log_level="warning", **{"poll": 0.2, **kw})
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
    srv.load_weights(str(root), step, model)
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


# ----------------------------------------------------------------------------- transformers, offload

HF_PROMPTS = ["def main(", "hello world", "return x + 1"]


def _hf_model(config_dir: Path, seed: int) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).eval()


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama (hidden 64, 2 layers, vocab 320) and a byte-level BPE tokenizer trained here
    on a few strings, saved in one directory; steps 1 and 2 (two random inits) committed as
    ``{"model": model, "extra": ...}`` (what the serving load must leave unread)."""
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    base = tmp_path_factory.mktemp("hf")
    config_dir, root = base / "config", base / "run"
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<eos>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["def main(): return x + 1", "hello world", "import torch"] * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tokenizer.save_pretrained(config_dir)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=320,
        max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    cfg.save_pretrained(config_dir)
    models = {step: _hf_model(config_dir, seed=step) for step in (1, 2)}
    with Checkpointer(root) as ck:
        for step, model in models.items():
            ck.save(step, {"model": model, "extra": {"w": torch.ones(3)}})
        ck.wait()
    return {"config": config_dir, "root": root, "models": models, "tokenizer": tokenizer}


def hf_greedy(run: dict[str, Any], step: int, prompt: str, n: int = 8) -> str:
    """Greedy decoding by the saved model itself (not the snapshot), one request alone."""
    model, tok = run["models"][step], run["tokenizer"]
    ids = tok(prompt)["input_ids"]
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if token == tok.eos_token_id:
                break
            out.append(token)
        gen = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)  # fmt: skip
    assert [t for t in gen[0, len(ids) :].tolist() if t != tok.eos_token_id] == out  # the same decode
    return tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _unit_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters' bytes, the largest offload unit's: a module's own parameters)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    unit = max(
        sum(p.numel() * p.element_size() for p in m.parameters(recurse=False)) for m in model.modules()
    )
    return total, unit


@pytest.mark.parametrize("offload", [False, True], ids=["whole", "offloaded"])
def test_hf_causal_lm(start: Any, hf_run: dict[str, Any], offload: bool) -> None:
    total, unit = _unit_bytes(hf_run["models"][2])
    budget = total // 3 if offload else None
    assert budget is None or unit <= budget < total
    s = start(hf_run["root"], hf_config=str(hf_run["config"]), gpu_budget=budget, device="cpu")
    status, models = s.call("GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "run@step-2", models
    assert models["data"][0]["max_model_len"] == 128 and models["data"][0]["fmstore_model"] == "transformers"
    for prompt in HF_PROMPTS:
        out = s.complete(prompt, temperature=0)
        assert out["fmstore_step"] == 2 and out["choices"][0]["text"] == hf_greedy(hf_run, 2, prompt), out
        n = len(hf_run["tokenizer"](prompt)["input_ids"])
        assert out["usage"]["prompt_tokens"] == n
    assert s.complete(HF_PROMPTS[0], temperature=1.0, max_tokens=5)["usage"]["completion_tokens"] <= 5
    old = s.server.engine.weights
    assert (old.offload is not None) == offload
    # A swap (to step 1): the new weights serve (offloaded too), the old offload is removed.
    status, out = s.call("POST", "/update_weights_from_disk", {"model_path": str(hf_run["root"]), "step": 1})
    assert status == 200 and out["success"] is True, out
    for prompt in HF_PROMPTS:
        out = s.complete(prompt, temperature=0)
        assert out["fmstore_step"] == 1 and out["choices"][0]["text"] == hf_greedy(hf_run, 1, prompt), out
    models = s.call("GET", "/v1/models")[1]
    if offload:
        info = models["offload"]
        assert info["budget"] == budget and 0 < info["peak_resident_bytes"] <= budget < info["model_bytes"]
        assert s.call("GET", "/health")[1]["offload"]["budget"] == budget
        _assert_removed(old)
    else:
        assert models["offload"] is None and "offload" not in s.call("GET", "/health")[1]


def _assert_removed(old: srv.Weights) -> None:
    """The swapped-out model's offload was removed: it can be offloaded again (a live offload
    refuses a second one) and its store holds nothing."""
    from fmstore import HostTier, TieredStore
    from fmstore.offload import offload_parameters

    assert old.offload is not None and not list(old.offload.store.keys())
    again = offload_parameters(old.model, store=TieredStore([HostTier()]), device="cpu", budget=1 << 30)
    again.remove()


def test_offload_answers_as_whole(start: Any, root: Path) -> None:
    """train.py's GPT with a budget under its size: the same answers as the whole model's, peak
    within the budget; a committed step is loaded, offloaded, swapped in, the old offload removed."""
    with Checkpointer(root) as ck:
        shapes = {k: list(v.shape) for k, v in ck.manifest(4).tensors.items()}
    total, unit = _unit_bytes(srv.build_model(shapes))
    budget = total // 2
    assert unit <= budget < total
    whole, offl = start(), start(gpu_budget=budget, device="cpu")
    prompts = [PROMPT, "import os\n", "x" * 100]
    for prompt in prompts:
        assert (
            offl.complete(prompt, temperature=0)["choices"][0]["text"]
            == (whole.complete(prompt, temperature=0)["choices"][0]["text"])
        )
    info = offl.call("GET", "/v1/models")[1]["offload"]
    assert (
        info["budget"] == budget
        and 0 < info["peak_resident_bytes"] <= budget
        and info["model_bytes"] == total
    )
    assert info["device"] == "cpu" and whole.call("GET", "/v1/models")[1]["offload"] is None
    health = offl.call("GET", "/health")[1]
    assert health["step"] == 4 and health["offload"]["peak_resident_bytes"] <= budget
    old = offl.server.engine.weights
    commit(root, 6, seed=1)
    deadline = time.monotonic() + 20
    while offl.server.engine.weights.step != 6:
        assert time.monotonic() < deadline, "step 6 was not served"
        time.sleep(0.02)
    assert offl.server.engine.weights.offload is not None
    assert offl.complete(temperature=0)["choices"][0]["text"] == greedy(root, 6)
    _assert_removed(old)


def test_hf_config_refused(
    hf_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config without its tokenizer, or no config at all: a ConfigError naming what is missing,
    before anything is served."""
    from fmstore import ConfigError, FmstoreError

    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_bytes((hf_run["config"] / "config.json").read_bytes())
    root = str(hf_run["root"])
    with pytest.raises(ConfigError, match="no tokenizer in .*tokenizer.json"):
        srv.serve(root, hf_config=str(bare), port=free_port())
    with pytest.raises(ConfigError, match="no such file"):
        srv.serve(root, hf_config=str(tmp_path / "nothing"), port=free_port())
    with pytest.raises(ConfigError, match="gpu-budget"):
        srv.serve(root, hf_config=str(hf_run["config"]), gpu_budget="lots", port=free_port())
    # --prefix names the part of the state holding the model: here one that is not a model.
    with pytest.raises(FmstoreError, match="does not fit the load target"):
        srv.serve(root, hf_config=str(hf_run["config"]), prefix="extra", port=free_port())
    code = cli(["serve", root, "--hf-config", str(bare / "config.json"), "--port", str(free_port())])
    assert code != 0 and "no tokenizer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["serve", "--help"])
    help_text = capsys.readouterr().out
    assert all(opt in help_text for opt in ("--hf-config", "--prefix", "--gpu-budget", "--device"))


def test_hf_dtypes_follow_the_snapshot(hf_run: dict[str, Any], tmp_path: Path) -> None:
    """A bfloat16 snapshot with one float32 tensor: the model is built in those dtypes, and the
    streaming load fills it with the saved values."""
    model = _hf_model(hf_run["config"], seed=3).to(torch.bfloat16)
    model.model.norm.weight.data = model.model.norm.weight.data.float()
    root = tmp_path / "bf16"
    with Checkpointer(root) as ck:
        ck.save(1, {"model": model}).wait()
        tensors = dict(ck.manifest(1).tensors)
    family = srv.CausalLM(hf_run["config"])
    built = family.build(tensors, "cpu")
    srv.load_weights(str(root), 1, built)
    saved, loaded = model.state_dict(), built.state_dict()
    assert loaded["model.norm.weight"].dtype == torch.float32
    assert loaded["lm_head.weight"].dtype == torch.bfloat16
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
