"""Large CPU flat buffers as huge-page mappings (slbi_triton/hugepages.py): advised and
aligned, private to the process, and everything users do with an optimizer's parameters
and state (checkpoints, copies, pickling, shared memory, fork) works as with torch's own
allocator."""

from __future__ import annotations

import copy
import ctypes
import io
import os
import pickle

import pytest
import torch
from torch import nn

from slbi_triton import SLBI, hugepages

from .helpers import all_params

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not hugepages.advisable(CPU, hugepages.MIN_BYTES), reason="MADV_HUGEPAGE is Linux-only"
)


def vm_flags(address: int) -> list[str]:
    """The kernel's VmFlags of the mapping holding ``address`` (``hg``: MADV_HUGEPAGE)."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                low, high = (int(bound, 16) for bound in head[0].split("-"))
                inside = low <= address < high
            elif inside and head[0] == "VmFlags:":
                return head[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def big_model() -> nn.Sequential:
    torch.manual_seed(0)  # 2.1M float32 parameters: an 8 MiB bucket
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 10))


def train(model: nn.Module, opt: SLBI, steps: int = 2) -> None:
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 1024, generator=data)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32-state", "bf16-state"])
def test_large_buffers_are_advised_huge_pages_and_aligned(state_dtype: torch.dtype | None) -> None:
    model = big_model()
    opt = SLBI(model.named_parameters(), lr=0.1, momentum=0.9, state_dtype=state_dtype)
    train(model, opt)
    weight = model[0].weight
    buffers = [weight, weight.grad, opt.state[weight]["z"], opt.state[weight]["momentum_buffer"]]
    for lane, tensor in enumerate(buffers):  # W, g, Z, v: lanes 0-3
        start = tensor.untyped_storage().data_ptr()
        assert start % hugepages.HUGE_PAGE_BYTES == lane * hugepages.LANE_BYTES
        assert "hg" in vm_flags(start)


def test_small_and_cuda_buffers_come_from_torch() -> None:
    small = hugepages.zeros(1000, torch.float32, CPU)
    # torch's allocator (a resizable storage), not a mapping of ours (torch.frombuffer). Its
    # VmFlags say nothing: malloc may place it in a region torch advised for a large tensor.
    assert torch.equal(small, torch.zeros(1000)) and small.untyped_storage().resizable()
    big = hugepages.zeros(hugepages.MIN_BYTES, torch.float32, CPU)
    assert not big.untyped_storage().resizable()
    assert not hugepages.advisable(torch.device("cuda"), 1 << 30)


def test_a_mapping_is_zero_and_outlives_every_name_but_its_views() -> None:
    flat = hugepages.zeros(hugepages.MIN_BYTES // 2, torch.bfloat16, CPU)
    assert flat.dtype == torch.bfloat16 and not flat.any()
    view = flat[5:10]
    del flat
    view.fill_(3.0)
    assert view.float().sum() == 15.0


def test_a_forked_child_writes_a_copy() -> None:
    """MAP_PRIVATE: a DataLoader worker's writes never reach the parent's parameters."""
    flat = hugepages.zeros(hugepages.MIN_BYTES // 4, torch.float32, CPU)
    pid = os.fork()
    if pid == 0:  # the child writes with memset: no thread pool after fork
        ctypes.memset(flat.data_ptr(), 0x7F, flat.numel() * 4)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert status == 0 and not flat.any()


def test_checkpoints_copies_and_shared_memory_work_on_mapped_buffers() -> None:
    model = big_model()
    opt = SLBI(model.named_parameters(), lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    train(model, opt)
    saved_model, saved_opt = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), saved_model)
    torch.save(opt.state_dict(), saved_opt)
    twins = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    restored = big_model()
    restored.load_state_dict(torch.load(io.BytesIO(saved_model.getvalue())))
    restored_opt = SLBI(restored.named_parameters(), lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    restored_opt.load_state_dict(torch.load(io.BytesIO(saved_opt.getvalue())))
    twins.append((restored, restored_opt))
    model.share_memory()  # moves the whole flat buffer to shared memory; the views follow
    assert all(p.is_shared() for p in all_params(opt))
    for other_model, other_opt in [(model, opt), *twins]:
        train(other_model, other_opt)
    for other_model, _ in twins:
        for ours, theirs in zip(model.parameters(), other_model.parameters(), strict=True):
            assert torch.equal(ours, theirs)
