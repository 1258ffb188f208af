"""How the package calls a model and checks what goes into it: the autocast precisions (AMP),
eval mode, predictions without autograd, uint8 pixels to [0, 1] floats, and the input checks
(images in the box, integer labels in range) with their messages."""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn

# names of the autocast precisions accepted by the trainer and the CLIs
AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def predict(model: nn.Module, x: Tensor, amp_dtype: torch.dtype | None = None) -> Tensor:
    """Logits without autograd, under autocast: every prediction outside training. The caller
    holds the model in eval_mode (once around its loop, not once per call)."""
    with torch.no_grad(), autocast(x.device, amp_dtype):
        return model(x)


def label_error(lo, hi, num_classes: int) -> ValueError:
    return ValueError(f"labels must lie in [0, {num_classes - 1}] (the model has {num_classes} outputs), "
                      f"got values in [{lo}, {hi}]")


def box_error(name: str, x_min: float, x_max: float, lo: float, hi: float) -> ValueError:
    return ValueError(f"{name} must hold images in [{lo}, {hi}] (pixel space), got values in [{x_min:.4g}, "
                      f"{x_max:.4g}]: scale 0-255 images by 1/255 and put normalisation inside the model "
                      "(aaa_fast.models.Normalize as its first layer)")


def check_label_dtype(y: Tensor) -> None:
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"y must hold integer class labels, got {y.dtype}")


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
