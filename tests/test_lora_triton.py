"""lorakit.speed.kernels.lora_dropout: the dropout-in-matmul kernels give dropout(x) @ A^T and its exact gradients for the mask
they draw, the mask has torch dropout's distribution, and the fused LoRA layer uses them (and their mask in
backward) when Triton can run. On a CPU machine the kernels run in Triton's interpreter (fp32: the interpreter
mishandles bf16 arithmetic); on a GPU the same tests run the compiled kernels in bf16."""

import pytest
import torch

triton = pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton.knobs.runtime.interpret:
    pytest.skip("Triton's interpreter is off (tests/conftest.py turns it on before triton is imported)",
                allow_module_level=True)


@pytest.fixture
def lt():
    """lorakit.speed.kernels.lora_dropout and the device its kernels run on here."""
    from lorakit.speed.kernels import lora_dropout as lora_triton

    return lora_triton, DEVICE


def _dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


@pytest.mark.parametrize("shape", [(37, 100, 8), (64, 256, 16), (130, 70, 20), (96, 128, 64),
                                   pytest.param((8192, 256, 16), marks=pytest.mark.skipif(DEVICE == "cpu",
                                                                                          reason="slow interpreted"))])
def test_kernels_match_dropout_then_matmul_with_their_mask(lt, shape):
    mod, device = lt
    M, K, R = shape
    dt = _dtype(device)
    torch.manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dt)
    a = (torch.randn(R, K, device=device) * 0.1).to(dt)
    gh = torch.randn(M, R, device=device, dtype=dt)
    p, seed = 0.3, 1234
    h = mod.down_forward(x, a, p, seed)
    gx, ga = mod.down_backward(x, a, gh, p, seed)
    mask = mod.dropout_mask(M, K, p, seed, device)
    xr, ar = x.float().requires_grad_(), a.float().requires_grad_()
    ref = (xr * mask / (1 - p)) @ ar.t()
    ref.backward(gh.float())
    tol = 1e-4 if dt == torch.float32 else 2e-2
    for got, want in ((h, ref), (gx, xr.grad), (ga, ar.grad)):
        assert got.shape == want.shape
        assert (got.float() - want).abs().max() <= tol * want.abs().max()
    assert gx.dtype == x.dtype and h.dtype == a.dtype and ga.dtype == torch.float32
    assert bool(((gx == 0) | mask).all())  # dropped elements get no gradient


def test_mask_has_dropouts_distribution(lt):
    mod, device = lt
    p = 0.25
    m1 = mod.dropout_mask(64, 512, p, 7, device)
    m2 = mod.dropout_mask(64, 512, p, 8, device)
    keep = m1.float().mean().item()
    assert abs(keep - (1 - p)) < 0.01  # 32768 draws: 4 standard deviations ~ 0.0096
    assert torch.equal(m1, mod.dropout_mask(64, 512, p, 7, device))  # the backward draws the same mask
    assert 0.3 < (m1 != m2).float().mean().item() < 0.45  # another seed, another mask (2p(1-p) = 0.375)
    rows = m1.float().mean(1)
    assert rows.std().item() < 0.05 and (m1[0] != m1[1]).any()  # no row is special or repeated


def test_mask_draws_are_independent_of_their_neighbours(lt):
    """The draws hash (seed, row, column): neighbours in a row, a column, a diagonal, the four corners of random
    rectangles (the row and column hashes are combined by XOR) and the same element under the next seed behave
    as independent draws. Bounds: 5 standard deviations."""
    mod, device = lt
    p, q = 0.25, 0.75
    m = mod.dropout_mask(256, 512, p, 7, device).float().cpu()

    def near(got, want, n):
        assert abs(got - want) < 5 * (want * (1 - want) / n) ** 0.5, (got, want)

    near(m.mean().item(), q, m.numel())
    near(m.diagonal().mean().item(), q, 256)  # row i and column i hash apart
    for a, b in ((m[:, :-1], m[:, 1:]), (m[:-1], m[1:]), (m[:-1, :-1], m[1:, 1:])):
        near((a * b).mean().item(), q * q, a.numel())
    g = torch.Generator().manual_seed(0)
    r, c = torch.randint(0, 256, (2, 100_000), generator=g), torch.randint(0, 512, (2, 100_000), generator=g)
    ok = (r[0] != r[1]) & (c[0] != c[1])
    odd = ((m[r[0], c[0]] + m[r[0], c[1]] + m[r[1], c[0]] + m[r[1], c[1]])[ok] % 2).mean().item()
    near(odd, (1 - (1 - 2 * p) ** 4) / 2, int(ok.sum()))  # an odd number of the four corners dropped
    m2 = mod.dropout_mask(256, 512, p, 8, device).float().cpu()
    near((m * m2).mean().item(), q * q, m.numel())


def test_fused_lora_layer_uses_the_kernels_and_their_mask_in_backward(lt, monkeypatch):
    """The fused LoRA function on a device where Triton runs: same output and gradients as torch's
    dropout -> matmul with the mask drawn from the seed the layer took from torch's RNG."""
    from lorakit.speed import fused_lora

    mod, device = lt
    if device == "cpu":
        monkeypatch.setattr(mod, "available", lambda device_type, dtype, rank: True)
    assert mod.available(device, torch.bfloat16, 16)
    dt = _dtype(device)
    torch.manual_seed(0)
    x = torch.randn(2, 9, 48, device=device, dtype=dt, requires_grad=True)
    a = (torch.randn(16, 48, device=device) * 0.1).requires_grad_()
    b = (torch.randn(24, 16, device=device) * 0.1).requires_grad_()
    base = torch.randn(2, 9, 24, device=device, dtype=dt, requires_grad=True)
    torch.manual_seed(5)
    out = fused_lora.lora_delta(base, x, a, b, 0.2, 2.0, True)
    out.backward(torch.ones_like(out))
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    mask = mod.dropout_mask(18, 48, 0.2, seed, device).view(2, 9, 48)
    xr, ar, br = (t.detach().float().requires_grad_() for t in (x, a, b))
    ref = base.detach().float() + 2.0 * ((xr * mask / 0.8) @ ar.t()) @ br.t()
    ref.backward(torch.ones_like(ref))
    tol = 1e-4 if dt == torch.float32 else 2e-2
    for got, want in ((out, ref), (x.grad, xr.grad), (a.grad, ar.grad), (b.grad, br.grad)):
        assert (got.float() - want).abs().max() <= tol * want.abs().max()
    assert torch.equal(base.grad, torch.ones_like(base)) and a.grad.dtype == a.dtype


def test_only_a_gpu_runs_the_kernels_for_16_bit_compute_and_ranks_up_to_64():
    from lorakit.speed.kernels import lora_dropout as lora_triton

    assert not lora_triton.available("cpu", torch.bfloat16, 16)  # even with the interpreter on (this session)
    assert lora_triton.available("cuda", torch.bfloat16, 16) and lora_triton.available("cuda", torch.float16, 64)
    assert not lora_triton.available("cuda", torch.float32, 16)  # fp32 keeps torch's dropout and matmul
    assert not lora_triton.available("cuda", torch.bfloat16, 128)  # one tile per rank: not measured beyond 64


def test_kernels_read_rows_through_their_stride(lt):
    """x may be a column slice of a wider tensor (row stride > K): the kernels read it in place."""
    mod, device = lt
    dt = _dtype(device)
    torch.manual_seed(1)
    wide = torch.randn(40, 80, device=device, dtype=dt)
    x = wide[:, 8:56]
    assert x.stride(0) == 80 and x.stride(1) == 1
    a = (torch.randn(16, 48, device=device) * 0.1).to(dt)
    gh = torch.randn(40, 16, device=device, dtype=dt)
    h = mod.down_forward(x, a, 0.1, 99)
    gx, ga = mod.down_backward(x, a, gh, 0.1, 99)
    xc = x.contiguous()
    h2 = mod.down_forward(xc, a, 0.1, 99)
    gx2, ga2 = mod.down_backward(xc, a, gh, 0.1, 99)
    assert torch.equal(h, h2) and torch.equal(gx, gx2) and torch.allclose(ga, ga2, rtol=1e-5, atol=1e-6)


def test_checkpointed_recompute_keeps_the_forward_mask(lt, monkeypatch):
    """Under torch's non-reentrant checkpoint (lorakit's), backward uses the mask of the original forward: the
    gradients equal those of the same step without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from lorakit.speed import fused_lora

    mod, device = lt
    if device == "cpu":
        monkeypatch.setattr(mod, "available", lambda device_type, dtype, rank: True)
    dt = _dtype(device)

    def step(checkpointed: bool):
        torch.manual_seed(0)
        x = torch.randn(2, 9, 48, device=device, dtype=dt, requires_grad=True)
        a = (torch.randn(16, 48, device=device) * 0.1).requires_grad_()
        b = (torch.randn(24, 16, device=device) * 0.1).requires_grad_()
        base = torch.randn(2, 9, 24, device=device, dtype=dt)

        def layer(x):
            return fused_lora.lora_delta(base, x.tanh(), a, b, 0.3, 2.0, True).square().sum()

        torch.manual_seed(7)
        loss = checkpoint(layer, x, use_reentrant=False) if checkpointed else layer(x)
        torch.manual_seed(123)  # the RNG moves on before backward (as other layers' dropout would move it)
        loss.backward()
        return loss.detach(), x.grad, a.grad, b.grad

    plain, ckpt = step(False), step(True)
    for got, want in zip(ckpt, plain):
        assert torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-6)


def test_a_seed_in_device_memory_draws_the_scalar_seeds_mask(lt):
    """Under CUDA graphs the kernels read their seed from device memory (DeviceSeeds): the same value gives the
    same mask, forward and backward, as the seed passed as an argument."""
    mod, device = lt
    dt = _dtype(device)
    torch.manual_seed(0)
    x = torch.randn(40, 96, device=device, dtype=dt)
    a = (torch.randn(8, 96, device=device) * 0.1).to(dt)
    gh = torch.randn(40, 8, device=device, dtype=dt)
    seeds = mod.DeviceSeeds(3, device)
    seeds.refresh()
    with mod.device_seeds(seeds):
        mod.active_seeds().take()
        slot = mod.active_seeds().take()  # the second slot
    value = int(seeds.values[1])
    assert 0 <= value < 2**31 - 1 and seeds.used == 2 and mod.active_seeds() is None
    assert torch.equal(mod.down_forward(x, a, 0.25, slot), mod.down_forward(x, a, 0.25, value))
    gx1, ga1 = mod.down_backward(x, a, gh, 0.25, slot)
    gx2, ga2 = mod.down_backward(x, a, gh, 0.25, value)
    assert torch.equal(gx1, gx2) and torch.equal(ga1, ga2)
    assert torch.equal(mod.dropout_mask(40, 96, 0.25, slot, device), mod.dropout_mask(40, 96, 0.25, value, device))
    before = seeds.values.clone()
    seeds.refresh()  # a new step: new seeds
    assert not torch.equal(before, seeds.values)
    with pytest.raises(RuntimeError, match="more LoRA dropout calls"):
        with mod.device_seeds(seeds):
            for _ in range(4):
                seeds.take()
