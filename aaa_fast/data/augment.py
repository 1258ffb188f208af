"""Batched augmentation on the training device: no per-image Python work."""
from __future__ import annotations

import torch
from torch import Tensor


def random_crop_flip(x: Tensor, *, pad: int = 4, flip: bool = True, generator: torch.Generator | None = None) -> Tensor:
    """Random `pad`-pixel-padded crops (zero padding) and horizontal flips of a batch (B, C, H, W),
    any dtype; the same generator gives the same batch."""
    b, _, h, w = x.shape
    opts = dict(device=x.device, generator=generator)
    if pad > 0:
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), **opts)
        ox = torch.randint(0, 2 * pad + 1, (b,), **opts)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]   # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]   # (B, 1, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mirrored = torch.rand(b, **opts) < 0.5
        x = torch.where(mirrored[:, None, None, None], x.flip(3), x)
    return x
