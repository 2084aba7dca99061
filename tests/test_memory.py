"""TensorMemory: the peak of live tensor bytes, what torch.cuda.max_memory_allocated reports on a
GPU, measured on any device."""

import pytest
import torch

from blockskip.memory import TensorMemory

MiB = 2**20


def _train(width: int, batch: int, steps: int = 2, device: str = "cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(4)]).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    with TensorMemory() as mem:
        for _ in range(steps):
            x = torch.randn(batch, width, device=device)
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return mem, (model, optimizer)  # the optimizer's moments live as long as it does


def test_peak_counts_weights_gradients_optimizer_and_activations():
    width, batch = 256, 512
    mem, _ = _train(width, batch)
    weights = 4 * width * width * 4
    activations = 4 * batch * width * 4  # the input of each linear layer, saved for backward
    # at the optimizer step: weights, gradients and two AdamW moments are all alive
    assert mem.peak_bytes >= 4 * weights
    assert mem.peak_bytes <= 4 * weights + 3 * activations
    # after the loop: weights and two moments stay, gradients and activations are gone
    assert 3 * weights <= mem.current_bytes <= 3 * weights + batch * width * 4 + 64 * 1024


def test_more_activations_raise_the_peak_by_about_their_size():
    small, _ = _train(256, 256)
    large, _ = _train(256, 2048)
    grown = large.peak_bytes - small.peak_bytes
    saved = 4 * (2048 - 256) * 256 * 4  # four saved layer inputs
    assert 0.8 * saved <= grown <= 2.5 * saved


def test_freed_tensors_leave_the_count_and_views_share_their_storage():
    with TensorMemory() as mem:
        a = torch.zeros(MiB // 4)  # 1 MiB of float32
        view = a[: 10]
        b = view + 1  # a new 40-byte storage; the view itself is not new memory
        assert mem.current_bytes == MiB + b.untyped_storage().nbytes()
        del a, view
        assert mem.current_bytes == b.untyped_storage().nbytes()
    assert mem.peak_bytes == MiB + 40


def test_meta_tensors_are_not_memory():
    with TensorMemory() as mem:
        torch.zeros(1 << 20, device="meta") + 1
    assert mem.peak_bytes == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_cuda_max_memory_allocated():
    _train(64, 64, steps=1, device="cuda")  # cuBLAS workspaces (forward and autograd threads): not tensors
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    mem, _ = _train(1024, 4096, device="cuda")
    torch.cuda.synchronize()
    cuda_peak = torch.cuda.max_memory_allocated() - start
    assert abs(mem.peak_bytes - cuda_peak) <= 0.1 * cuda_peak, (mem.peak_bytes, cuda_peak)
