"""Training-step and sampling throughput of the default suite's tiny DiT, for `make bench`.

The default suite's wall time is mostly these two loops, so a regression here is a
regression of `make run`."""
from __future__ import annotations

import pytest
import torch

import harness
from harness import sampling, training


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared machine: one thread is what a baseline can hold
    yield
    torch.set_num_threads(threads)


def _suite_dit():
    torch.manual_seed(0)
    return harness.create("backbone", "dit", size="tiny", patch=2, depth=2, hidden_size=64, input_size=16,
                          in_channels=3, num_classes=10)


def test_training_step(benchmark):
    model = _suite_dit()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = training.make_scheduler()
    gen = torch.Generator().manual_seed(0)
    x0, y = torch.randn(16, 3, 16, 16, generator=gen), torch.randint(0, 10, (16,), generator=gen)
    t, noise = torch.randint(0, 1000, (16,), generator=gen), torch.randn(16, 3, 16, 16, generator=gen)
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise

    def step():
        loss, _ = training.default_loss(model, x0, t, y, noise, x_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    # adaLN-Zero and the zero final layer: the untrained model predicts 0, so the first
    # loss is the noise's mean square; the optimizer step must then lower it.
    first = step()
    assert first.item() == pytest.approx(noise.square().mean().item(), rel=1e-6)
    assert step().item() < first.item()
    assert torch.isfinite(benchmark(step))


def test_ddim_sampling(benchmark):
    from harness.context import derive_seed

    model = _suite_dit().eval()
    out = benchmark(lambda: sampling.sample_batch(model, list(range(16)), shape=(3, 16, 16), num_classes=10,
                                                  sampler="ddim", steps=10)[0])
    assert out.shape == (16, 3, 16, 16)
    # The untrained model predicts eps = 0, so each deterministic DDIM step scales x by
    # sqrt(abar_prev / abar_t): ten steps telescope to x_T * sqrt(abar_0 / abar_900)
    # (set_alpha_to_one is off: the last "previous" is abar at t = 0).
    abar = training.make_scheduler().alphas_cumprod.double()
    x_t = torch.stack([torch.randn((3, 16, 16), generator=torch.Generator().manual_seed(derive_seed(0, "sample", i)))
                       for i in range(16)])
    torch.testing.assert_close(out.double(), x_t.double() * (abar[0] / abar[900]).sqrt(), rtol=1e-5, atol=1e-6)
