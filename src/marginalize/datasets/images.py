"""CIFAR-shaped images generated offline, and the usual CIFAR training augmentation.

:func:`cifar_like` draws images with class structure (each class a smooth colour template,
each image that template shifted, rescaled and overlaid with its own smooth pattern and pixel
noise), stored as ``uint8`` like CIFAR-10 so 50,000 of them take 150 MB. :class:`ImageDataset`
serves them as ``torch.utils.data.Dataset`` items, normalized to float, with the standard
augmentation of CIFAR recipes (He et al. 2016): a random 32x32 crop of the image padded by 4
pixels, and a horizontal flip with probability 1/2.

Examples
--------
>>> from torch.utils.data import DataLoader
>>> x, y = cifar_like(100, seed=0)
>>> x.shape, x.dtype, int(y.max()) < 10
(torch.Size([100, 3, 32, 32]), torch.uint8, True)
>>> xb, yb = next(iter(DataLoader(ImageDataset(x, y, augment=True), batch_size=8)))
>>> xb.shape, xb.dtype
(torch.Size([8, 3, 32, 32]), torch.float32)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cifar_like", "ImageDataset"]


def _smooth(n: int, channels: int, size: int, coarse: int, gen: torch.Generator) -> torch.Tensor:
    low = torch.randn(n, channels, coarse, coarse, generator=gen)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def cifar_like(
    n: int,
    *,
    num_classes: int = 10,
    seed: int = 0,
    size: int = 32,
    channels: int = 3,
    noise: float = 1.0,
    similarity_gap: float = 0.3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` generated images with labels: ``x`` ``(n, channels, size, size)`` uint8 and
    ``y`` ``(n,)`` int64 (balanced classes in random order).

    Every class template is one shared smooth pattern plus ``similarity_gap`` times a
    class-specific one, and each image a random window of its class template, rescaled, plus
    ``noise`` times its own smooth pattern and pixel noise: a smaller gap or more noise is
    harder (at the defaults a linear classifier on the pixels reaches about 70% accuracy).
    The same arguments give the same images on every machine (torch's CPU generator).
    """
    gen = torch.Generator().manual_seed(int(seed))
    big = size + 8  # templates are larger than the images: each image is a shifted window
    shared = _smooth(1, channels, big, 4, gen)
    templates = shared + similarity_gap * _smooth(num_classes, channels, big, 4, gen)
    y = torch.randperm(n, generator=gen) % num_classes
    out = torch.empty(n, channels, size, size, dtype=torch.uint8)
    for i in range(0, n, 2048):
        yb = y[i : i + 2048]
        b = yb.shape[0]
        off = torch.randint(0, big - size + 1, (b, 2), generator=gen)
        rows = (off[:, :1] + torch.arange(size))[:, None, :, None]  # (b, 1, size, 1)
        cols = (off[:, 1:] + torch.arange(size))[:, None, None, :]  # (b, 1, 1, size)
        t = templates[yb]
        img = t[
            torch.arange(b)[:, None, None, None], torch.arange(channels)[:, None, None], rows, cols
        ]
        img = img * (0.7 + 0.6 * torch.rand(b, 1, 1, 1, generator=gen))
        img = img + noise * _smooth(b, channels, size, 8, gen)
        img = img + 0.5 * noise * torch.randn(b, channels, size, size, generator=gen)
        out[i : i + b] = (img * 48 + 128).clamp(0, 255).round().to(torch.uint8)
    return out, y


class ImageDataset(torch.utils.data.Dataset):
    """``uint8`` images as normalized float tensors, optionally with CIFAR augmentation.

    Parameters
    ----------
    x : torch.Tensor
        ``(N, C, H, W)`` uint8 images.
    y : torch.Tensor
        ``(N,)`` labels.
    augment : bool
        A random crop of the image padded by ``pad`` pixels (zeros) and a random horizontal
        flip, drawn afresh for every item read (the torch global RNG, so a DataLoader's worker
        seeding applies).
    pad : int
        Padding of the random crop.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, *, augment: bool = False, pad: int = 4):
        self.x = x
        self.y = y
        self.augment = augment
        self.pad = pad
        xf = x[: min(len(x), 4096)].float()
        self.mean = xf.mean((0, 2, 3), keepdim=True)[0]
        self.std = xf.std((0, 2, 3), keepdim=True)[0].clamp_min(1e-3)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.x[i]
        if self.augment:
            p = self.pad
            h, w = img.shape[-2:]
            padded = F.pad(img, (p, p, p, p))
            top, left = torch.randint(0, 2 * p + 1, (2,)).tolist()
            img = padded[:, top : top + h, left : left + w]
            if bool(torch.rand(()) < 0.5):
                img = img.flip(-1)
        return (img.float() - self.mean) / self.std, self.y[i]
