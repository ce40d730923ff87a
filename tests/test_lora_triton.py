"""lorakit.lora_triton: the dropout-in-matmul kernels give dropout(x) @ A^T and its exact gradients for the mask
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
    """lorakit.lora_triton and the device its kernels run on here."""
    from lorakit import lora_triton

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


def test_fused_lora_layer_uses_the_kernels_and_their_mask_in_backward(lt, monkeypatch):
    """The fused LoRA function on a device where Triton runs: same output and gradients as torch's
    dropout -> matmul with the mask drawn from the seed the layer took from torch's RNG."""
    from lorakit import speed

    mod, device = lt
    if device == "cpu":
        monkeypatch.setattr(mod, "available", lambda device_type, dtype: True)
    assert mod.available(device, torch.bfloat16)
    dt = _dtype(device)
    torch.manual_seed(0)
    x = torch.randn(2, 9, 48, device=device, dtype=dt, requires_grad=True)
    a = (torch.randn(16, 48, device=device) * 0.1).requires_grad_()
    b = (torch.randn(24, 16, device=device) * 0.1).requires_grad_()
    base = torch.randn(2, 9, 24, device=device, dtype=dt, requires_grad=True)
    torch.manual_seed(5)
    out = speed.lora_delta(base, x, a, b, 0.2, 2.0, True)
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


def test_only_a_gpu_runs_the_kernels():
    from lorakit import lora_triton

    assert not lora_triton.available("cpu", torch.bfloat16)  # even with the interpreter on (this session)
    assert lora_triton.available("cuda", torch.bfloat16) and lora_triton.available("cuda", torch.float16)
    assert not lora_triton.available("cuda", torch.float32)  # fp32 keeps torch's dropout and matmul
