"""Resume that restores everything: Stateful values, strict keys, RNG, saves that overlap the next
step, host-memory saves that do not wait for a durable one, and commits at interpreter exit."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hold_writes, rounds

from fmstore import Checkpointer, Policy, RNGState
from fmstore.checkpoint import SnapshotNotFoundError, StateKeysError
from fmstore.tiers.host import size_class

ROOT = Path(__file__).resolve().parents[1]


def make(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def step(model, opt, sched) -> float:
    x = torch.randn(8, 16)  # the RNG decides the data: it must come back too
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    sched.step()
    return loss.item()


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fresh_objects_resume_bit_exact(tmp_path):
    model, opt, sched = make()
    rng = RNGState()
    with Checkpointer(tmp_path) as ck:
        for i in range(1, 4):
            step(model, opt, sched)
            ck.save(i, {"model": model, "optim": opt, "sched": sched, "rng": rng, "step": i})
    reference = [step(model, opt, sched) for _ in range(5)]
    final = weights(model)

    torch.manual_seed(123)  # a new process: other RNG state, fresh objects, empty optimizer
    random.seed(5)
    np.random.seed(5)
    model2, opt2, sched2 = make(seed=99)
    assert len(opt2.state) == 0
    with Checkpointer(tmp_path) as ck:
        out = ck.load({"model": model2, "optim": opt2, "sched": sched2, "rng": RNGState(), "step": 0})
    assert out["step"] == 3 and out["model"] is model2 and out["optim"] is opt2
    assert len(opt2.state) == len(list(model2.parameters()))
    assert sched2.last_epoch == sched.last_epoch - 5 and sched2.get_last_lr() == [1e-2 * 0.5]
    resumed = [step(model2, opt2, sched2) for _ in range(5)]
    assert resumed == reference
    for k, v in weights(model2).items():
        assert torch.equal(v, final[k]), k


def test_rng_state_round_trips_all_generators(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    np.random.randn()  # a cached gaussian in numpy's state
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"rng": RNGState()})
        expect = (torch.rand(3), random.random(), np.random.randn(2))
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)
        ck.load({"rng": RNGState()})
    got = (torch.rand(3), random.random(), np.random.randn(2))
    assert torch.equal(got[0], expect[0]) and got[1] == expect[1] and np.array_equal(got[2], expect[2])


def test_strict_keys_name_both_sides(tmp_path):
    model, opt, _ = make()
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"model": model, "extra": torch.ones(2), "step": 1})
        # A target key the snapshot lacks, and a snapshot key the target lacks:
        with pytest.raises(StateKeysError) as err:
            ck.load({"model": make()[0], "bias": torch.zeros(2), "step": 0})
        assert err.value.missing == ["bias"] and err.value.unexpected == ["extra"]
        assert "'bias'" in str(err.value) and "'extra'" in str(err.value) and "strict=False" in str(err.value)
        assert isinstance(err.value, KeyError)
        # A model with a different architecture is refused, naming its parameters.
        other = torch.nn.Sequential(torch.nn.Linear(16, 32))
        with pytest.raises(StateKeysError, match="model/1.running_mean"):
            ck.load({"model": other, "extra": torch.zeros(2), "step": 0})
        # A target asking for a Stateful the snapshot does not have.
        with pytest.raises(StateKeysError, match="'optim'"):
            ck.load({"model": make()[0], "extra": torch.zeros(2), "step": 0, "optim": opt})
        assert len(opt.state) == 0  # a failed load leaves a fresh optimizer fresh
        # strict=False loads the keys both have and leaves the others as they are.
        bias = torch.full((2,), 5.0)
        target = make()[0]
        out = ck.load({"model": target, "bias": bias, "step": 0}, strict=False)
        assert torch.equal(bias, torch.full((2,), 5.0)) and "extra" not in out and out["step"] == 1
        assert torch.equal(target[0].weight, model[0].weight)


def test_plain_state_dict_of_a_fresh_optimizer_is_refused_with_a_hint(tmp_path):
    model, opt, sched = make()
    step(model, opt, sched)
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"model": model.state_dict(), "optim": opt.state_dict()})
        fresh_model, fresh_opt, _ = make()
        with pytest.raises(StateKeysError, match="put the optimizer itself in the state"):
            ck.load({"model": fresh_model.state_dict(), "optim": fresh_opt.state_dict()})
        # The same snapshot loads into the optimizer object, as its state dict was saved.
        ck.load({"model": fresh_model, "optim": fresh_opt})
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_missing_snapshot_leaves_a_fresh_optimizer_untouched(tmp_path):
    model, opt, _ = make()
    with Checkpointer(tmp_path) as ck:
        with pytest.raises(SnapshotNotFoundError):
            ck.load({"model": model, "optim": opt})
    assert len(opt.state) == 0


@pytest.mark.parametrize("list_later", [False, True], ids=["listed-in-save", "listed-by-feeder"])
def test_non_blocking_save_overlaps_and_keeps_the_step(tmp_path, list_later):
    """block=False: the copy runs while the next forward/backward does; the next optimizer step
    waits for it, so the snapshot holds the weights of the step it was taken at.  With a GPU
    the feeder thread also lists the parameters and optimizer state (their buffers and views:
    most of a save's Python work), off the training thread; ``list_later`` runs that path here."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(512, 2048), torch.nn.BatchNorm1d(2048), torch.nn.Linear(2048, 512)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(32, 512)
    model(x).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    before = weights(model)
    state_bytes = sum(t.numel() * t.element_size() for t in before.values()) + sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
    )
    with Checkpointer(tmp_path, max_persists=1) as ck:
        ck._pipeline.stager.list_later = list_later
        handle = ck.save(1, {"model": model, "optim": opt}, block=False)
        model(x).pow(2).mean().backward()  # updates BatchNorm's running stats: copied before this
        opt.step()  # waits for the parameters' copies first
        handle.wait()
        assert not torch.equal(model[0].weight, before["0.weight"])
        assert handle.nbytes == state_bytes
        # The first save pinned the steady state's buffers (max_persists=1: the one being
        # staged is the one persisting), also when the feeder acquired them.
        assert ck._pipeline.stager.pool.reserved == 1 * sum(size_class(n) for n in ck._pipeline.reserved_for)
        fresh = torch.nn.Sequential(
            torch.nn.Linear(512, 2048), torch.nn.BatchNorm1d(2048), torch.nn.Linear(2048, 512)
        )
        ck.load({"model": fresh, "optim": torch.optim.SGD(fresh.parameters(), lr=0.1, momentum=0.9)})
    for k, v in weights(fresh).items():
        assert torch.equal(v, before[k]), k


def test_host_memory_save_does_not_wait_for_a_durable_one(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, policy=Policy(host_memory=1, every=4))
    held = hold_writes(monkeypatch, ck.storage)
    state = {"w": torch.zeros(1 << 16)}
    durable = ck.save(4, state)
    assert held.writing.wait(60)  # step 4's persist is writing, and stays blocked
    for s in (5, 6, 7):  # host-memory snapshots only: none waits for step 4's write
        state["w"].fill_(s)
        h = ck.save(s, state)
        assert h.done() and h.wait().levels == ["host"]
    assert not durable.done()
    assert torch.equal(ck.load()["w"], torch.full((1 << 16,), 7.0))  # from host memory
    held.release.set()
    assert durable.wait().levels == ["host", "local"]  # kept in host memory at save time, too
    monkeypatch.undo()
    assert torch.equal(ck.load(step=4, level="local")["w"], torch.zeros(1 << 16))
    ck.close()


def test_delete_uncommits_and_keeps_referenced_bytes(tmp_path):
    with Checkpointer(tmp_path) as ck:
        ck.save(1, {"a": torch.ones(10), "b": torch.zeros(10)})
        ck.save(2, {"a": torch.ones(10), "b": torch.ones(10)})  # "a" is referenced in step 1's file
        ck.delete(1)
        assert ck.steps() == [2]
        assert torch.equal(ck.load()["a"], torch.ones(10))
        with pytest.raises(SnapshotNotFoundError):
            ck.delete(1)


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    from fmstore import Checkpointer, HostTier, LocalTier, TieredStore
    root, step = sys.argv[1], int(sys.argv[2])
    ck = Checkpointer(root + "/ckpt")
    ck.save(step, {"w": torch.full((1 << 20,), float(step)), "step": step})
    store = TieredStore([HostTier("64MiB"), LocalTier(root + "/store")], write_back=True)
    store.put(f"t{step}", torch.full((1 << 18,), float(step)))
    # no close(), no wait(): the interpreter exits with both in flight
    """
)


@pytest.mark.slow
def test_exit_without_close_commits_every_time(tmp_path):
    script = tmp_path / "save_and_exit.py"
    script.write_text(EXIT_SCRIPT)
    n = rounds(6)
    for i in range(1, n + 1):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path), str(i)], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert "failed" not in proc.stderr and "NOT" not in proc.stderr, proc.stderr
    with Checkpointer(tmp_path / "ckpt") as ck:
        assert ck.steps() == list(range(1, n + 1))
        assert ck.load()["step"] == n
    from fmstore import LocalTier

    assert sorted(LocalTier(tmp_path / "store").list()) == sorted(f"t{i}" for i in range(1, n + 1))


FORK_SCRIPT = textwrap.dedent(
    """
    import os, sys, threading, torch
    from fmstore import Checkpointer
    ck = Checkpointer(sys.argv[1])
    go = threading.Event()
    write = ck.storage.write
    def held(rel, segments, **kw):
        go.wait()
        return write(rel, segments, **kw)
    ck.storage.write = held
    ck.save(1, {"w": torch.ones(10)})  # its persist waits for `go`
    pid = os.fork()
    if pid == 0:
        sys.exit(0)  # the interpreter's exit hooks run, as at a DataLoader worker's exit
    _, status = os.waitpid(pid, 0)
    print("child exited", os.waitstatus_to_exitcode(status), flush=True)
    go.set()
    ck.close()
    print("committed", Checkpointer(sys.argv[1]).steps())
    """
)


def test_a_forked_child_does_not_wait_for_its_parents_saves(tmp_path):
    """A forked child (a DataLoader worker) exiting while the parent has a save in flight:
    the child has none of the parent's threads, so waiting for that save at its exit hung it
    until the loader killed it (5 s at every epoch end of a loader with workers)."""
    script = tmp_path / "fork.py"
    script.write_text(FORK_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "child exited 0" in proc.stdout and "committed [1]" in proc.stdout
    assert "finishing" not in proc.stderr  # the child said nothing about the parent's save


SIGTERM_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, threading, torch
    from fmstore import Checkpointer
    ck = Checkpointer(sys.argv[1])
    go = threading.Event()
    write = ck.storage.write
    def slow(rel, segments, **kw):
        if rel.endswith("manifest.json"):
            os.kill(os.getpid(), signal.SIGTERM)  # the commit is still to be written
        return write(rel, segments, **kw)
    ck.storage.write = slow
    ck.save(1, {"w": torch.ones(1000)})
    signal.pause()  # SIGTERM arrives while step 1 persists
    """
)


def test_sigterm_finishes_the_commit_then_dies_of_sigterm(tmp_path):
    script = tmp_path / "sigterm.py"
    script.write_text(SIGTERM_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ck")], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -15, proc.stderr
    with Checkpointer(tmp_path / "ck") as ck:
        assert ck.steps() == [1]


def test_an_earlier_step_saved_after_a_later_one_references_only_earlier_files(tmp_path):
    state = {"w": torch.ones(100), "v": torch.zeros(100)}
    with Checkpointer(tmp_path) as ck:
        ck.save(10, state).wait()
        ck.save(5, state).wait()  # e.g. a restart from step 5's data: step 10 is not its base
        ck.save(20, state).wait()
        assert ck.manifest(5).files  # written, not referenced into step 10
        assert not ck.manifest(20).files  # referenced into step 5 (the newest commit of this process)
        for s in (5, 10, 20):
            assert torch.equal(ck.load(step=s)["w"], torch.ones(100))
    with Checkpointer(tmp_path) as ck:  # a new process: the base is the newest step before the one saved
        ck.save(7, state).wait()
        assert {sh.file.split("/")[0] for e in ck.manifest(7).tensors.values() for sh in e.shards} == {
            "step-0000000005"
        }


def test_state_keys_error_pickles(tmp_path):
    import pickle

    e = StateKeysError("msg", ["a"], ["b"])
    back = pickle.loads(pickle.dumps(e))
    assert (
        type(back) is StateKeysError
        and back.missing == ["a"]
        and back.unexpected == ["b"]
        and str(back) == "msg"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_non_blocking_save_of_cuda_state_keeps_the_step(tmp_path):
    """On a GPU the copies run on a side stream: BatchNorm's buffers (changed by forward) are
    copied before the caller's stream goes on, the parameters while forward/backward run."""
    torch.manual_seed(0)

    def build():
        return torch.nn.Sequential(
            torch.nn.Linear(1024, 4096), torch.nn.BatchNorm1d(4096), torch.nn.Linear(4096, 1024)
        ).cuda()

    model = build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randn(256, 1024, device="cuda")
    for _ in range(2):
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    before = weights(model)
    moments = {k: v.clone() for k, v in opt.state[model[0].weight].items()}
    with Checkpointer(tmp_path, policy=Policy(host_memory=1)) as ck:
        handle = ck.save(1, {"model": model, "optim": opt}, block=False)
        for _ in range(3):  # forward changes the buffers at once; the first step waits for the copy
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        handle.wait()
        fresh = build()
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
        ck.load({"model": fresh, "optim": fresh_opt}, level="local")
    for k, v in weights(fresh).items():
        assert torch.equal(v, before[k]), k
    for k, v in fresh_opt.state[fresh[0].weight].items():
        assert torch.equal(v, moments[k]), k


def test_saved_names_are_dcps(tmp_path):
    """Modules and their optimizers are saved under torch DCP's names (computed once per module
    and cached, since DCP's getters check the whole model on each call)."""
    from torch.distributed.checkpoint import state_dict as dsd

    from fmstore.checkpoint.stateful import for_save

    model, opt, sched = make()
    step(model, opt, sched)
    saved = for_save({"model": model, "optim": opt}).state
    ref_model, ref_opt = dsd.get_model_state_dict(model), dsd.get_optimizer_state_dict(model, opt)
    assert list(saved["model"]) == list(ref_model)
    assert all(saved["model"][k].data_ptr() == ref_model[k].data_ptr() for k in ref_model)
    assert saved["optim"]["param_groups"] == ref_opt["param_groups"]
    assert (
        list(saved["optim"]["state"])
        == list(ref_opt["state"])
        == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    )
    for k, st in ref_opt["state"].items():
        assert all(torch.equal(saved["optim"]["state"][k][n], v) for n, v in st.items())
