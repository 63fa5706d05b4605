"""cg_fast.Pipeline: many threads get the samples they would get alone; nothing is captured or compiled after
warm-up; a bad request fails alone; memory stays flat."""
from __future__ import annotations

import threading

import pytest
import torch

from cg_fast import Pipeline
from cg_fast.testbeds.digits import load_testbed


@pytest.fixture(scope="module")
def pipe():
    tb = load_testbed(networks=("cond",))
    with Pipeline(tb.nets["cond"], guidance="cfg", scale=2.0, steps="5", batch_sizes=(1, 2, 4, 8),
                  max_wait_ms=50, device="cpu") as p:
        p.warmup()
        yield p


def test_threads_get_the_samples_they_would_get_alone(pipe):
    requests = [([i % 10, (i + 3) % 10], [100 + i, 200 + i]) for i in range(8)]
    alone = [pipe(labels, seeds=seeds).images for labels, seeds in requests]
    got: dict[int, torch.Tensor] = {}

    def call(i):
        for _ in range(2):
            got[i] = pipe(requests[i][0], seeds=requests[i][1]).images

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    before = pipe.counters["batches"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        assert (got[i] - alone[i]).abs().max() <= 1e-5, i
    # fewer batches than requests: they were micro-batched
    assert pipe.counters["batches"] - before < 16
    assert pipe.counters["new_signatures_after_warmup"] == 0  # nothing captured or compiled after warm-up


def test_padding_to_the_same_batch_size_is_bitwise(pipe):
    a = pipe([3, 4, 5], seeds=[7, 8, 9]).images     # padded to 4
    b = pipe([3, 4, 5, 6], seeds=[7, 8, 9, 10]).images  # 4, no padding
    assert torch.equal(a, b[:3])


def test_a_bad_request_fails_alone(pipe):
    errors, good = [], []

    def bad():
        try:
            pipe([3, 99], seeds=[1, 2])
        except ValueError as e:
            errors.append(str(e))

    def fine(i):
        good.append(pipe([i], seeds=[i]).images.shape)

    threads = [threading.Thread(target=bad)] + [threading.Thread(target=fine, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "[0, 10)" in errors[0]
    assert good == [torch.Size([1, 1, 8, 8])] * 3


def test_overrides_uint8_timings_and_accounting(pipe):
    r = pipe([1, 2], seeds=[5, 6], output="uint8")
    assert r.images.dtype == torch.uint8 and r.images.shape == (2, 8, 8, 1)
    assert set(r.timings) == {"queue", "sampling", "decode"} and r.stats["denoiser_rows"] > 0
    with pytest.raises(TypeError, match="unknown request option"):
        pipe([1], seeds=[1], stepz="10")
    before = pipe.counters["new_signatures_after_warmup"]
    pipe([1], seeds=[1], steps="3")  # another setting: its own batch, counted as new after warm-up
    assert pipe.counters["new_signatures_after_warmup"] == before + 1


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_memory_stays_flat(pipe):
    for _ in range(10):
        pipe([1], seeds=[1])
    held, rss = pipe.memory(), _rss_bytes()
    for i in range(100):
        pipe([i % 10], seeds=[i])
    assert pipe.memory() == held
    assert _rss_bytes() - rss < 32 * 2**20  # no growth beyond allocator noise
