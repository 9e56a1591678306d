"""Two processes (gloo, CPU), each capturing half the data, reduce to the single-process moments."""

from __future__ import annotations

import os
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp

import covsvd

LENGTHS = [[6, 3, 8], [2, 5], [7, 7, 1], [4]]


def _worker(rank: int, world: int, out_dir: str) -> None:
    import torch.distributed as dist
    from conftest import padded_batches, tiny_bert

    from covsvd.capture.distributed import all_reduce_moments

    torch.set_num_threads(1)
    # a file store: no process hosts a server the other still needs while it tears down
    store = dist.FileStore(os.path.join(out_dir, "store"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        model = tiny_bert()  # same seed: same weights in every process
        shard = padded_batches(LENGTHS, seed=3)[rank::world]  # this process's half of the data
        moments = covsvd.capture_moments(model, shard, progress=False, all_reduce=True)
        covsvd.save_moments(moments, os.path.join(out_dir, f"rank{rank}.safetensors"))
        # processes holding different layers must fail loudly, not hang or sum unrelated tensors
        names = list(moments)[: 3 + rank]
        try:
            all_reduce_moments({n: moments[n] for n in names})
        except ValueError as e:
            assert "differ between processes" in str(e)
        else:
            raise AssertionError("mismatched layouts were reduced")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # no process closes its gloo sockets (by exiting) before every process has torn its group down
    store.add("destroyed", 1)
    deadline = time.monotonic() + 60
    while store.add("destroyed", 0) < world:
        assert time.monotonic() < deadline, "the other process never tore its group down"
        time.sleep(0.01)
    # skip interpreter finalisation: gloo's worker threads can abort the process there (SIGABRT, "terminate
    # called without an active exception") after all work is done; the results are on disk already
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.slow
def test_two_gloo_processes_reduce_to_the_single_process_result(tmp_path):
    from conftest import padded_batches, tiny_bert

    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: the same fp32 forward, bit for bit
    try:
        single = covsvd.capture_moments(tiny_bert(), padded_batches(LENGTHS, seed=3), progress=False)
    finally:
        torch.set_num_threads(threads)
    for rank in range(2):
        reduced = covsvd.load_moments(tmp_path / f"rank{rank}.safetensors")
        for name, m in single.items():
            r = reduced[name]
            assert r.count == m.count, name
            for field in ("sum_xx", "sum_x", "sum_abs"):
                a, b = getattr(r, field), getattr(m, field)
                assert float((a - b).norm() / b.norm()) <= 1e-13, (name, field)
        q = "encoder.layer.0.attention.self.query"
        assert reduced[q] is reduced["encoder.layer.0.attention.self.value"]


def test_all_reduce_without_a_process_group_raises():
    m = covsvd.SecondMoment.from_rows(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="init_process_group"):
        m.all_reduce()
