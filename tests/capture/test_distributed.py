"""Two processes (gloo, CPU), each capturing half the data, reduce to the single-process moments."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import covsvd

LENGTHS = [[6, 3, 8], [2, 5], [7, 7, 1], [4]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from conftest import padded_batches, tiny_bert

    from covsvd.capture.distributed import all_reduce_moments

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
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
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_reduce_to_the_single_process_result(tmp_path):
    from conftest import padded_batches, tiny_bert

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
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
