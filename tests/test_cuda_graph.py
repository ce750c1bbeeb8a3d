"""nn.cuda_graph: a training step captured once as a CUDA graph and replayed.

Without a GPU the control flow is checked with a stand-in for CuPy's stream API (warm-up runs,
one capture, replays, the private pool, a host sync inside the capture reported); on a GPU, the
graphed step trains exactly like eager steps."""

import types

import numpy as np
import pytest

from nn.cuda_graph import CaptureError, GraphedStep


class _FakeCupy:
    """Records the calls GraphedStep makes (a stand-in for CuPy's stream, pool and graph API)."""

    def __init__(self, sync_inside=False):
        self.log = []
        fake = self

        class Event:
            def synchronize(self):
                fake.log.append("event.synchronize")

        class Stream:
            def __init__(self, non_blocking=False, name="side"):
                self.name, self.capturing = name, False

            def record(self):
                fake.log.append(f"{self.name}.record")
                return Event()

            def wait_event(self, e):
                fake.log.append(f"{self.name}.wait_event")

            def synchronize(self):
                if self.capturing:
                    raise RuntimeError("operation not permitted when stream is capturing")
                fake.log.append(f"{self.name}.synchronize")

            def begin_capture(self):
                self.capturing = True
                fake.log.append("begin_capture")

            def end_capture(self):
                self.capturing = False
                fake.log.append("end_capture")
                return Graph()

            def is_capturing(self):
                return self.capturing

            def __enter__(self):
                fake.log.append(f"enter {self.name}")
                fake.current = self
                return self

            def __exit__(self, *exc):
                fake.log.append(f"exit {self.name}")
                fake.current = fake.caller

        class Graph:
            def launch(self, stream=None):
                fake.log.append(f"launch on {stream.name}")

        class Pool:
            def malloc(self, n):
                return n

            def total_bytes(self):
                return 123

        class Allocator:
            def __init__(self, malloc):
                pass

            def __enter__(self):
                fake.log.append("private pool on")

            def __exit__(self, *exc):
                fake.log.append("private pool off")

        self.caller = Stream(name="caller")
        self.current = self.caller
        self.cuda = types.SimpleNamespace(Stream=Stream, MemoryPool=Pool, using_allocator=Allocator,
                                          get_current_stream=lambda: fake.current)


def test_warm_up_then_one_capture_then_replays():
    cp = _FakeCupy()
    calls = []

    def step():
        calls.append(cp.current.capturing)
        return "loss"

    graphed = GraphedStep(step, warmup=2, keep_alive=("x",), cupy=cp)
    assert graphed() == "loss" and graphed() == "loss"
    assert calls == [False, False] and graphed.graph is None and graphed.eager_steps == 2
    assert graphed() == "loss"                     # the capture, then one replay: still one step
    assert calls == [False, False, True]
    assert cp.log.count("launch on side") == 1 and graphed.replays == 1
    log = cp.log
    assert log.index("begin_capture") < log.index("end_capture") < log.index("launch on side")
    assert log.index("side.synchronize") < log.index("begin_capture")     # the warm-up finished first
    capture_pool = [i for i, e in enumerate(log) if e == "private pool on"][-1]
    assert capture_pool < log.index("begin_capture") < log.index("private pool off", capture_pool)
    assert graphed() == "loss" and graphed() == "loss"
    assert calls == [False, False, True]           # replays do not run Python
    assert cp.log.count("launch on side") == 3 and graphed.replays == 3
    # every call orders itself after the caller's work and the caller's next work after it
    assert cp.log.count("side.wait_event") == 5 and cp.log.count("caller.wait_event") == 5
    assert graphed.keep_alive == ("x",) and graphed.pool_bytes() == 123


def test_a_host_sync_inside_the_capture_is_reported():
    cp = _FakeCupy()
    graphed = GraphedStep(lambda: cp.current.synchronize(), warmup=1, cupy=cp)
    graphed()                                      # eager: synchronising is allowed
    with pytest.raises(CaptureError, match="host synchronisation"):
        graphed()
    assert "end_capture" in cp.log                 # the capture was closed: the stream stays usable
    with pytest.raises(ValueError, match="warmup"):
        GraphedStep(lambda: None, warmup=0, cupy=cp)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_graph_replays_train_exactly_like_eager_steps(precision):
    """On a GPU: 2 eager warm-ups, the capture (+ one replay) and 3 replays are 6 training steps
    that leave the parameters, momenta and loss totals as 6 eager steps do."""
    import cupy
    import nn
    from bench import train as bt
    size = dict(bt.SIZES["tiny"])
    a = bt.build_setup(precision, "cuda", size, seed=0, dynamic_scale=True)
    b = bt.build_setup(precision, "cuda", size, seed=0, dynamic_scale=True)
    for _ in range(6):
        bt.eager_step(a)
    graphed = GraphedStep(lambda: bt.eager_step(b), warmup=2, keep_alive=(b.x, b.y))
    for _ in range(6):
        graphed()
    cupy.cuda.get_current_stream().synchronize()
    assert graphed.replays == 4
    for (name, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        np.testing.assert_allclose(nn.device.to_numpy(q.data), nn.device.to_numpy(p.data), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    np.testing.assert_allclose(nn.device.to_numpy(b.loss_totals), nn.device.to_numpy(a.loss_totals), rtol=1e-5)


@pytest.mark.gpu
def test_a_host_read_inside_the_captured_step_is_a_capture_error_on_the_gpu():
    """The real stream API: a step that reads a device value works eagerly, and its capture fails
    with CaptureError; the abandoned capture is ended, so the stream is usable again."""
    import cupy
    x = cupy.arange(8, dtype=np.float32)
    cupy.cuda.get_current_stream().synchronize()
    graphed = GraphedStep(lambda: float((x * 2).sum()), warmup=1)
    assert graphed() == 56.0
    with pytest.raises(CaptureError, match="host synchronisation"):
        graphed()
    assert not graphed.stream.is_capturing() and graphed.graph is None
    with graphed.stream:
        assert float((x + 1).sum()) == 36.0
