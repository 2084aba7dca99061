"""blockskip.quant: the stored layout, the rounding error, and the autograd path that saves no
full-precision weight for backward."""

import pytest
import torch

from blockskip.quant import NF4_CODE, QuantLinear, quantize_nf4, quantized_bytes


def saved_float_weights(fn, shape):
    """Float tensors of `shape` (or its transpose) that autograd saves for backward while `fn` runs."""
    saved = []

    def pack(t):
        if t.is_floating_point() and sorted(t.shape) == sorted(shape):
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("scheme", ["int8", "nf4"])
def test_backward_saves_no_full_precision_weight_but_a_plain_dequantizing_linear_does(scheme):
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 192)
    quant = QuantLinear.from_linear(linear, scheme)
    x = torch.randn(3, 128, requires_grad=True)
    out, saved = saved_float_weights(lambda: quant(x), (192, 128))
    assert not saved, "QuantLinear keeps only the quantized weight"
    out.square().sum().backward()
    # the scheme the issue warns about: a plain linear on the dequantized weight. Its input needs a
    # gradient (LoRA sits below), so autograd saves the full-precision weight for dL/dx, per layer.
    reference = x.detach().clone().requires_grad_()
    ref_out, naive = saved_float_weights(
        lambda: torch.nn.functional.linear(reference, quant.dequantized(), linear.bias), (192, 128))
    assert naive, "the check sees a saved full-precision weight when there is one"
    ref_out.square().sum().backward()
    assert torch.allclose(out, ref_out, atol=1e-5) and torch.allclose(x.grad, reference.grad, atol=1e-5)


def test_weights_round_as_documented_and_store_at_the_documented_size():
    torch.manual_seed(0)
    weight = torch.randn(256, 320) * 0.02
    errors = {}
    for scheme in ("int8", "nf4"):
        linear = torch.nn.Linear(320, 256, bias=False)
        linear.weight.data = weight.clone()
        quant = QuantLinear.from_linear(linear, scheme)
        errors[scheme] = ((quant.dequantized() - weight).norm() / weight.norm()).item()
        held = sum(b.numel() * b.element_size() for b in quant.buffers())
        assert held == quantized_bytes((256, 320), scheme)
    # Gaussian weights: int8 per channel ~1% (max/127 steps of a ~3.5 sigma range), NF4 ~10% (QLoRA)
    assert errors["int8"] < 0.015 and 0.05 < errors["nf4"] < 0.12, errors
    assert quantized_bytes((3072, 12288), "nf4") / (3072 * 12288 * 2) < 0.26


def test_nf4_packs_two_codes_per_byte_high_nibble_first():
    weight = torch.zeros(1, 64)
    weight[0, 0], weight[0, 1], weight[0, 2] = -2.0, 2.0, 1.0  # absmax 2: codes -1 -> 0, 1 -> 15, 0.5 -> nearest
    packed = quantize_nf4(weight)
    nearest = int((NF4_CODE - 0.5).abs().argmin())
    assert packed["weight_nf4"][0].item() == (0 << 4) | 15
    assert packed["weight_nf4"][1].item() >> 4 == nearest and packed["weight_nf4"][1].item() & 15 == 7  # 0.0 is code 7
    assert packed["weight_nf4"].dtype == torch.uint8 and packed["weight_nf4"].numel() == 32


def test_under_autocast_it_computes_in_bf16_and_returns_the_inputs_gradient_dtype():
    quant = QuantLinear.from_linear(torch.nn.Linear(64, 64), "nf4")
    x = torch.randn(2, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quant(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
