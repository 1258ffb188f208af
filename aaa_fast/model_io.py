"""How the package calls a model and checks what goes into it: the autocast precisions (AMP),
eval mode, predictions without autograd, uint8 pixels to [0, 1] floats, and the input checks
(images in the box, integer labels in range) with their messages."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

# names of the autocast precisions accepted by the trainer and the CLIs; "auto" is resolved by
# resolve_amp to one of the others (AMP_CHOICES: what the CLIs offer)
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = (*AMP, "auto")
# CPU flags (Linux /proc/cpuinfo) of native bf16 matrix arithmetic: without them bf16 is emulated
# on the CPU and slower than fp32
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


AS_ASKED = "as asked"  # resolve_amp's reason for a precision that was named, not chosen


def resolve_amp(amp: str, device: torch.device | str) -> tuple[str, str]:
    """(precision, why): "auto" becomes "bf16" where `device` computes in bf16 natively (a CUDA
    device with bf16 support; a CPU with AMX-BF16 or AVX512-BF16), else "none" (fp32); any other
    name is returned as given."""
    if amp != "auto":
        return amp, AS_ASKED
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"auto: {name} computes in bf16"
        return "none", f"auto: {name} has no native bf16, fp32"
    if device.type == "cpu":
        have = sorted(set(CPU_BF16_FLAGS) & cpu_flags())
        if have:
            return "bf16", f"auto: the CPU has {', '.join(have)}"
        return "none", f"auto: the CPU has none of {', '.join(CPU_BF16_FLAGS)} (bf16 would be emulated), fp32"
    return "none", f"auto: no bf16 rule for {device.type} devices, fp32"



def resolve_precision(amp: str, channels_last: bool, device: torch.device | str) -> tuple[str, bool, str]:
    """(precision, channels_last, why): resolve_amp's choice; "auto" brings channels_last with bf16."""
    resolved, why = resolve_amp(amp, device)
    return resolved, channels_last or (amp == "auto" and resolved == "bf16"), why

@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Model in eval mode (BatchNorm statistics frozen), its previous mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def autocast(device: torch.device, amp_dtype: torch.dtype | None, cache: bool = True):
    """Autocast to `amp_dtype` (None: off). cache=False inside CUDA-graph captures: a cached
    cast of a weight would be frozen into the graph."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype, cache_enabled=cache)


def predict(model: nn.Module, x: Tensor, amp_dtype: torch.dtype | None = None, num_classes: int | None = None) -> Tensor:
    """Logits without autograd, under autocast: every prediction outside training. The caller
    holds the model in eval_mode (once around its loop, not once per call)."""
    with torch.no_grad(), autocast(x.device, amp_dtype):
        return check_logits(model(x), x.shape[0], num_classes)


def check_logits(out, n: int, num_classes: int | None = None) -> Tensor:
    """What the model returned, if it is logits of shape (n, C) (C = num_classes when given);
    otherwise an error naming what came back. Shapes only: no host synchronisation."""
    expected = f"({n}, {num_classes if num_classes is not None else 'C'})"
    if not isinstance(out, Tensor):
        hint = " (a model with several outputs needs a wrapper that returns the logits)" if isinstance(
            out, (dict, tuple, list)) else ""
        raise TypeError(f"the model must return a logits tensor of shape {expected}, got a "
                        f"{type(out).__name__}{hint}")
    if out.dim() != 2 or out.shape[0] != n or (num_classes is not None and out.shape[1] != num_classes):
        raise ValueError(f"the model must return logits of shape {expected}, got shape {tuple(out.shape)}")
    return out


def label_error(lo, hi, num_classes: int) -> ValueError:
    return ValueError(f"labels must lie in [0, {num_classes - 1}] (the model has {num_classes} outputs), "
                      f"got values in [{lo}, {hi}]")


def box_error(name: str, x_min: float, x_max: float, lo: float, hi: float) -> ValueError:
    return ValueError(f"{name} must hold images in [{lo}, {hi}] (pixel space), got values in [{x_min:.4g}, "
                      f"{x_max:.4g}]: scale 0-255 images by 1/255 and put normalisation inside the model "
                      "(aaa_fast.models.Normalize as its first layer)")


def check_label_dtype(y: Tensor) -> None:
    """Class labels: shape (N,), any integer dtype (taken as int64)."""
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"y must have shape (N,), one class label per row, got shape {tuple(y.shape)}")


def check_labels(y: Tensor, num_classes: int) -> None:
    check_label_dtype(y)
    if y.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.stack([y.min(), y.max()]).tolist()
        if lo < 0 or hi >= num_classes:
            raise label_error(lo, hi, num_classes)


def unit_float(x: Tensor) -> Tensor:
    """Images as float32 in [0, 1]: uint8 pixels (how the data is held) scaled by 1/255."""
    return x.float() / 255 if x.dtype == torch.uint8 else x.float()


def check_in_box(x: Tensor, lo: float, hi: float, name: str = "x", *, allow_nan: bool = False) -> None:
    """Float images outside [lo, hi] are nearly always 0-255 or normalised inputs, which the
    projection would silently clamp into the box. One host sync per call (per attack, not per step).
    NaN is refused too, unless `allow_nan` (the trainer's non-finite-loss handling takes it)."""
    if x.numel() and not torch.compiler.is_compiling():
        x_min, x_max = torch.stack(torch.aminmax(x.detach())).float().tolist()
        if allow_nan and (math.isnan(x_min) or math.isnan(x_max)):
            return
        if not (lo <= x_min and x_max <= hi):  # NaN fails too
            raise box_error(name, x_min, x_max, lo, hi)
