"""Quantized frozen weights of the kept blocks (QLoRA on the edge), in plain PyTorch.

The host quantizes every `nn.Linear` weight of the kept blocks (`blockskip plan --quant`) and
writes it into the kept-weights safetensors file in the layout below; the board never sees those
weights in full precision. The head, biases, norms and every non-Linear tensor stay as they were.
For the nn.Linear at module path P:

    int8  P.weight_int8   int8  (out, in)       symmetric per output channel: w = q * scale[row]
          P.weight_scale  fp32  (out,)
    nf4   P.weight_nf4    uint8 (ceil(n/64)*32,) two 4-bit NF4 codes per byte, first in the high
                                                  nibble, row-major over the flattened weight
                                                  (zero-padded to a multiple of 64)
          P.weight_absmax      int8 (B,)          per-64-block absmax, double-quantized: absmax =
          P.weight_absmax_scale fp32 (B/256,)       q * scale[block // 256] + offset, with B padded
          P.weight_absmax_offset fp32 (1,)          to a multiple of 256
    (P.bias, when the layer has one, stays in full precision under its own name)

The file's safetensors metadata says `quant` ("int8" | "nf4"), `quant_block` (64),
`quant_absmax_block` (256) and `quant_shapes` (JSON {P: [out, in]}). NF4 is QLoRA's 4-bit
NormalFloat code (Dettmers et al. 2023, the 16 values in NF4_CODE); the double quantization of the
absmax here is linear int8 around the mean (bitsandbytes uses its own 8-bit float code), so the
file is read by this module, not by bitsandbytes.

On the board `QuantLinear` holds those tensors and computes through `QuantLinearFunction`, which
dequantizes the weight for the matmul and again in backward: autograd keeps no full-precision copy
of the weight (a plain `F.linear(x, dequantize(w))` would save one per layer for backward, which
costs more than bf16 weights). Only the input gradient flows through; the weight is frozen.
peft wraps `QuantLinear` through its custom-module dispatch (`LoraConfig._register_custom_module`)
with `QuantLoraLinear`, peft's own LoRA Linear layer, so LoRA keys are the full model's.
"""

from __future__ import annotations

import json
import math

import torch
from torch import nn

QUANT_SCHEMES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # weights per absmax (QLoRA)
ABSMAX_BLOCK = 256  # absmax values per double-quantization scale (QLoRA)
# QLoRA's NF4 code: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0])
SUFFIXES = {"int8": ("weight_int8", "weight_scale"),
            "nf4": ("weight_nf4", "weight_absmax", "weight_absmax_scale", "weight_absmax_offset")}


# ---------------------------------------------------------------- quantize (host) / dequantize

def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return {"weight_int8": q.contiguous(), "weight_scale": scale.contiguous()}


def dequantize_int8(t: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    return t["weight_int8"].to(dtype).mul_(t["weight_scale"].to(dtype)[:, None])


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -x.numel() % multiple
    return torch.cat([x, x.new_zeros(extra)]) if extra else x


def quantize_nf4(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    flat = _pad(weight.detach().float().reshape(-1), NF4_BLOCK).view(-1, NF4_BLOCK)  # (B, 64)
    absmax = flat.abs().amax(dim=1)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    normed = (flat / absmax[:, None]).reshape(-1)
    code = NF4_CODE.to(flat.device)
    codes = torch.bucketize(normed, (code[1:] + code[:-1]) / 2).to(torch.uint8)  # nearest code
    packed = (codes[0::2] << 4) | codes[1::2]
    # double quantization of the absmax: int8 around their mean, one fp32 scale per 256
    offset = absmax.mean()
    centered = _pad(absmax - offset, ABSMAX_BLOCK).view(-1, ABSMAX_BLOCK)
    amax = centered.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(centered / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)
    return {"weight_nf4": packed.contiguous(), "weight_absmax": q.contiguous(),
            "weight_absmax_scale": scale.contiguous(), "weight_absmax_offset": offset.reshape(1).contiguous()}


_PAIR_TABLES: dict[tuple, torch.Tensor] = {}


def _pair_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 2): the two NF4 values that each byte holds, so one gather decodes two weights."""
    key = (dtype, str(device))
    if key not in _PAIR_TABLES:
        byte = torch.arange(256)
        _PAIR_TABLES[key] = torch.stack([NF4_CODE[byte >> 4], NF4_CODE[byte & 15]], 1).to(device, dtype)
    return _PAIR_TABLES[key]


def dequantize_nf4(t: dict[str, torch.Tensor], shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    absmax = (t["weight_absmax"].float().view(-1, ABSMAX_BLOCK) * t["weight_absmax_scale"][:, None]
              ).reshape(-1) + t["weight_absmax_offset"]
    blocks = t["weight_nf4"].numel() * 2 // NF4_BLOCK
    values = nn.functional.embedding(t["weight_nf4"].int(), _pair_table(dtype, t["weight_nf4"].device))  # (n/2, 2)
    values = values.view(blocks, NF4_BLOCK).mul_(absmax[:blocks, None].to(dtype))
    return values.view(-1)[:math.prod(shape)].view(shape)


def quantize_weight(weight: torch.Tensor, scheme: str) -> dict[str, torch.Tensor]:
    return quantize_int8(weight) if scheme == "int8" else quantize_nf4(weight)


def quantized_bytes(shape: tuple[int, int], scheme: str) -> int:
    """Bytes of one Linear weight of `shape` stored as `scheme` (what the file and the board hold)."""
    out, inp = shape
    if scheme == "int8":
        return out * inp + 4 * out
    blocks = math.ceil(out * inp / NF4_BLOCK)
    padded = math.ceil(blocks / ABSMAX_BLOCK) * ABSMAX_BLOCK
    return blocks * NF4_BLOCK // 2 + padded + 4 * (padded // ABSMAX_BLOCK) + 4


# ---------------------------------------------------------------- the board's module

def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a Linear computes in here: autocast's where it is on (bf16 on CUDA), else x's."""
    kind = x.device.type
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    if kind == "cuda" and torch.is_autocast_enabled():
        return torch.get_autocast_gpu_dtype()
    return torch.get_autocast_cpu_dtype() if kind == "cpu" and torch.is_autocast_cpu_enabled() else x.dtype


class QuantLinearFunction(torch.autograd.Function):
    """y = x W^T + b with W dequantized on the fly; backward dequantizes again and returns only
    dL/dx (W and b are frozen), so nothing but the quantized weight outlives the forward."""

    @staticmethod
    def forward(ctx, x, module, bias):
        dtype = _compute_dtype(x)
        ctx.module, ctx.dtype, ctx.x_dtype = module, dtype, x.dtype
        weight = module.dequantized(dtype)
        return nn.functional.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight = ctx.module.dequantized(ctx.dtype)
        return (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype), None, None


class QuantLinear(nn.Module):
    """A frozen nn.Linear whose weight is held quantized (int8 or NF4, see the module doc)."""

    def __init__(self, in_features: int, out_features: int, scheme: str, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None):
        super().__init__()
        if scheme not in SUFFIXES:
            raise ValueError(f"scheme must be int8 or nf4, got {scheme!r}")
        if set(tensors) != set(SUFFIXES[scheme]):
            raise ValueError(f"{scheme} weight needs {SUFFIXES[scheme]}, got {sorted(tensors)}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str) -> "QuantLinear":
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, scheme, quantize_weight(linear.weight, scheme), bias)

    @property
    def qweight(self) -> torch.Tensor:
        """The packed quantized weight: peft places the LoRA layers on its device."""
        return getattr(self, SUFFIXES[self.scheme][0])

    def quantized(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in SUFFIXES[self.scheme]}

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme == "int8":
            return dequantize_int8(self.quantized(), dtype)
        return dequantize_nf4(self.quantized(), (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return QuantLinearFunction.apply(x, self, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, " \
               f"bias={self.bias is not None}"


def _lora_linear_class():
    from peft.tuners.lora import Linear as LoraLinear

    class QuantLoraLinear(LoraLinear):
        """peft's LoRA Linear over a QuantLinear: LoRA in fp32 on the quantized layer's device."""

        def _get_in_out_features(self, module):
            return module.in_features, module.out_features

        def _get_base_layer_device_and_dtype(self, base_layer):
            return base_layer.qweight.device, None  # keep the adapter's own dtype (fp32)

    return QuantLoraLinear


def register_with_peft(lora_config) -> None:
    """Let `lora_config` wrap QuantLinear modules (peft's custom-module dispatch)."""
    lora_config._register_custom_module({QuantLinear: _lora_linear_class()})


# ---------------------------------------------------------------- state dicts (host writes, board reads)

def quantize_linears(module: nn.Module, scheme: str) -> None:
    """Replace every nn.Linear inside `module` by a QuantLinear holding its weight as `scheme`."""
    for name, linear in list(module.named_modules()):
        if isinstance(linear, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent) if parent else module, child, QuantLinear.from_linear(linear, scheme))


def linear_names(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{name}" if name else prefix for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def quantize_state(state: dict[str, torch.Tensor], linears: list[str], scheme: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, safetensors metadata): `state` with the weight of every Linear in `linears` (full
    module paths) replaced by its quantized tensors. Each weight is quantized and dropped in turn."""
    if scheme not in SUFFIXES:
        raise ValueError(f"scheme must be int8 or nf4, got {scheme!r}")
    out, shapes = dict(state), {}
    for path in linears:
        weight = out.pop(f"{path}.weight")
        shapes[path] = list(weight.shape)
        out.update({f"{path}.{name}": t for name, t in quantize_weight(weight, scheme).items()})
    meta = {"quant": scheme, "quant_block": str(NF4_BLOCK), "quant_absmax_block": str(ABSMAX_BLOCK),
            "quant_shapes": json.dumps(shapes)}
    return out, meta


def install_quantized(model: nn.Module, state: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> str:
    """Replace every Linear that `metadata` names with a QuantLinear holding its tensors (popped
    from `state`, so the caller loads the rest); returns the scheme ("none" without metadata)."""
    scheme = (metadata or {}).get("quant", "none")
    if scheme == "none":
        return scheme
    if scheme not in SUFFIXES:
        raise ValueError(f"unknown weight quantization {scheme!r} (this build reads {', '.join(QUANT_SCHEMES)})")
    if int(metadata.get("quant_block", NF4_BLOCK)) != NF4_BLOCK or \
            int(metadata.get("quant_absmax_block", ABSMAX_BLOCK)) != ABSMAX_BLOCK:
        raise ValueError("NF4 block sizes other than 64 / 256 are not supported")
    for path, (out_features, in_features) in json.loads(metadata["quant_shapes"]).items():
        tensors = {name: state.pop(f"{path}.{name}") for name in SUFFIXES[scheme]}
        bias = state.pop(f"{path}.bias", None)
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                QuantLinear(in_features, out_features, scheme, tensors, bias))
    return scheme
