"""Real data that needs no download: bytes of the Python standard library, scikit-learn's digits.

* :func:`stdlib_bytes` — the ``.py`` files directly inside the running interpreter's standard
  library directory (``sysconfig.get_paths()["stdlib"]``), in sorted file-name order, joined
  with a newline. The split is fixed by file: every 10th file (index ≡ 9 mod 10) is held out as
  validation text, the rest is training text. Byte-level: vocabulary 256, no tokenizer.
* :func:`digits` — ``sklearn.datasets.load_digits``: 1,797 grey 8×8 images of 10 classes,
  scaled to [0, 1]; fixed split by index (every 5th image is validation).

Batches are drawn by a seeded generator, so a run's data stream depends on its seed only.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

BYTE_VOCAB = 256
#: Token id standing for a masked byte in masked-language modelling (outside the byte range).
MASK_ID = 256


def stdlib_files() -> list[Path]:
    """The standard library's top-level ``.py`` files, sorted by name (deterministic per Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.is_file())


@lru_cache(maxsize=2)
def stdlib_bytes(split: str = "train") -> Tensor:
    """The byte stream of the train or validation files (``uint8`` → ``int64`` tensor)."""
    if split not in ("train", "val"):
        raise ValueError(f"`split` must be 'train' or 'val', got {split!r}")
    files = stdlib_files()
    keep = [f for i, f in enumerate(files) if (i % 10 == 9) == (split == "val")]
    blob = b"\n".join(f.read_bytes() for f in keep)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(torch.int64)


def byte_batches(
    batch_size: int, seq_len: int, seed: int, split: str = "train"
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(x, y)`` next-byte batches at random offsets of the stream (``y`` = ``x`` shifted by one)."""
    data = stdlib_bytes(split)
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(seq_len + 1)
    while True:
        start = torch.randint(0, data.numel() - seq_len - 1, (batch_size,), generator=g)
        chunk = data[start[:, None] + idx]
        yield chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def masked_byte_batches(
    batch_size: int, seq_len: int, seed: int, mask_prob: float = 0.15, split: str = "train"
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless masked-LM batches: ``x`` with ``mask_prob`` of the bytes replaced by :data:`MASK_ID`,
    ``y`` the original byte there and ``-100`` (ignored) elsewhere."""
    data = stdlib_bytes(split)
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(seq_len)
    while True:
        start = torch.randint(0, data.numel() - seq_len, (batch_size,), generator=g)
        chunk = data[start[:, None] + idx]
        masked = torch.rand(chunk.shape, generator=g) < mask_prob
        x = torch.where(masked, torch.full_like(chunk, MASK_ID), chunk)
        y = torch.where(masked, chunk, torch.full_like(chunk, -100))
        yield x, y


@lru_cache(maxsize=2)
def digits(split: str = "train") -> tuple[Tensor, Tensor]:
    """scikit-learn's digits: ``(images (N, 1, 8, 8) float32 in [0, 1], labels (N,) int64)``."""
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"`split` must be 'train' or 'val', got {split!r}")
    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(d.target, dtype=torch.int64)
    keep = (torch.arange(labels.numel()) % 5 == 4) == (split == "val")
    return images[keep], labels[keep]


def digit_batches(batch_size: int, seed: int, split: str = "train") -> Iterator[tuple[Tensor, Tensor]]:
    """Endless ``(images, labels)`` batches drawn with replacement by a seeded generator."""
    images, labels = digits(split)
    g = torch.Generator().manual_seed(seed)
    while True:
        pick = torch.randint(0, labels.numel(), (batch_size,), generator=g)
        yield images[pick], labels[pick]
