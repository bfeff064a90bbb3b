"""Pre-LN Tiny-ViT on CIFAR-10: the paper's testbed, wired for ``lightning-stability``.

Run the main job (trains in FP32; the monitor answers "what would BF16 do?" on a
sample of every 5th batch, so it runs at FP32 speed with or without native BF16)::

    python examples/tiny_vit.py fit --config examples/configs/tiny_vit.yaml

the same model trained in BF16 mixed precision (fast only where the CPU or GPU has
native BF16: a CPU without it emulates BF16 matmuls, several times slower than FP32)::

    python examples/tiny_vit.py fit --config examples/configs/tiny_vit_bf16.yaml

and the "what would FP16 do?" job (trains in FP32, the monitor replays the
sampled batch under FP16 autocast)::

    python examples/tiny_vit.py fit --config examples/configs/tiny_vit_fp16_whatif.yaml

A run ends with the command that turns its logs into a verdict
(``lightning-stability report <log root>``). A bad callback value stops the run
before training with one line, ``error: ...``, naming the argument.

Without ``--data.data_dir`` the data is a deterministic synthetic CIFAR-shaped
set (nothing is downloaded, ever). With real data, point ``--data.data_dir`` at
an extracted copy of the CIFAR-10 *python* version (the folder holding
``data_batch_1`` ... ``data_batch_5`` and ``test_batch``, or its parent holding
``cifar-10-batches-py/``).
"""

from __future__ import annotations

import math
import pickle
import shutil
import sys
from pathlib import Path
from typing import Literal, NoReturn

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_stability  # noqa: F401  (StabilityMonitor / LNEpsilonBump: short names for the CLI)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
NUM_CHANNELS = 3


# --------------------------------------------------------------------------- model


class Attention(nn.Module):
    """Multi-head self-attention: one fused ``qkv`` projection, SDPA, output ``proj``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        # (B, n, 3d) -> (3, B, H, n, head_dim)
        qkv = self.qkv(x).reshape(b, n, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out))


class MLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-LN residual block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int, dropout: float, norm_eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads, dropout)
        self.norm2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, mlp_ratio * d_model, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(LightningModule):
    """The paper's pre-LN Tiny-ViT for 32x32 images.

    Patch size 4 gives 8x8 = 64 patch tokens plus a CLS token (65 tokens).
    The paper uses ``d_model`` in {96, 128}; any width divisible by ``n_heads``
    works here (the tests use a tiny one).

    Args:
        d_model: token width.
        depth: number of transformer blocks (``self.blocks``).
        n_heads: attention heads per block; must divide ``d_model``.
        mlp_ratio: FFN hidden width = ``mlp_ratio * d_model``.
        dropout: dropout on attention probabilities, projections and embeddings.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (matrices only; not norms, biases, embeddings).
        lr_schedule: ``cosine`` (linear warmup then cosine to 0) or ``constant``.
        warmup_steps: linear warmup steps for the cosine schedule.
        norm_eps: LayerNorm epsilon (``LNEpsilonBump`` may raise it during fit).
        num_classes: output classes.
        patch_size: patch side in pixels.
    """

    def __init__(
        self,
        d_model: int = 96,
        depth: int = 6,
        n_heads: int = 4,
        mlp_ratio: int = 2,
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_steps: int = 10,
        norm_eps: float = 1e-5,
        num_classes: int = 10,
        patch_size: int = 4,
    ) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        if IMAGE_SIZE % patch_size != 0:
            raise ValueError(f"patch_size={patch_size} must divide the image size {IMAGE_SIZE}")
        self.save_hyperparameters()
        num_patches = (IMAGE_SIZE // patch_size) ** 2
        self.patch_embed = nn.Conv2d(NUM_CHANNELS, d_model, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, d_model))
        self.pos_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, mlp_ratio, dropout, norm_eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(d_model, eps=norm_eps)
        self.head = nn.Linear(d_model, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    @property
    def num_tokens(self) -> int:
        return self.pos_embed.shape[1]

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, 64, d)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, x], dim=1) + self.pos_embed)  # (B, 65, d)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=-1) == labels).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def configure_optimizers(self):
        no_decay = {"cls_token", "pos_embed"}
        decay, other = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and name not in no_decay else other).append(p)
        optimizer = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": self.hparams.weight_decay},
                {"params": other, "weight_decay": 0.0},
            ],
            lr=self.hparams.lr,
        )
        if self.hparams.lr_schedule == "constant":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.hparams.warmup_steps, total)

        def lr_lambda(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# --------------------------------------------------------------------------- data


class _NormalizedUint8Images(Dataset):
    """uint8 (N, 3, 32, 32) images, normalized per item (keeps 50k images at 150 MB, not 600)."""

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        self.images = images
        self.labels = labels
        self.mean = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CIFAR10_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: int) -> tuple[Tensor, Tensor]:
        image = self.images[idx].float().div_(255.0)
        return (image - self.mean) / self.std, self.labels[idx]


def _unpickle(path: Path) -> tuple[Tensor, Tensor]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    data = entry[b"data"] if b"data" in entry else entry["data"]
    labels = entry.get(b"labels", entry.get("labels"))
    if labels is None:
        raise ValueError(f"{path} has no 'labels' entry; is it a CIFAR-10 python batch file?")
    images = torch.as_tensor(data, dtype=torch.uint8).reshape(-1, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE)
    return images, torch.as_tensor(labels, dtype=torch.long)


def resolve_cifar_dir(data_dir: str | Path) -> Path:
    """The folder holding ``test_batch``: ``data_dir`` itself or ``data_dir/cifar-10-batches-py``."""
    root = Path(data_dir).expanduser()
    for candidate in (root, root / "cifar-10-batches-py"):
        if (candidate / "test_batch").is_file() and any(candidate.glob("data_batch_*")):
            return candidate
    raise FileNotFoundError(
        f"data_dir={str(data_dir)!r} does not hold the CIFAR-10 python-version batches: expected "
        "'data_batch_1'..'data_batch_5' and 'test_batch' in it or in its 'cifar-10-batches-py/' "
        "subfolder. Extract cifar-10-python.tar.gz there (nothing is downloaded at run time), "
        "or leave data_dir unset to train on the synthetic data."
    )


def load_cifar10(data_dir: str | Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Read the CIFAR-10 python batches: ``((train_x, train_y), (test_x, test_y))``, images uint8.

    Every ``data_batch_*`` file present is used (the full set has five), in name order.
    """
    folder = resolve_cifar_dir(data_dir)
    train = [_unpickle(p) for p in sorted(folder.glob("data_batch_*"))]
    train_x = torch.cat([x for x, _ in train])
    train_y = torch.cat([y for _, y in train])
    return (train_x, train_y), _unpickle(folder / "test_batch")


def make_synthetic_cifar(
    n: int, seed: int = 0, num_classes: int = 10, noise: float = 2.5
) -> tuple[Tensor, Tensor]:
    """A deterministic, learnable CIFAR-shaped set: ``(images (n,3,32,32) float32, labels (n,))``.

    Each class has a fixed smooth template (a random 4x4 colour field upsampled
    to 32x32, plus a class colour offset); an example is its class template
    under a random contrast and a random shift of up to 4 pixels, plus Gaussian
    pixel noise (std ``noise`` relative to the unit-std template, so single
    pixels are mostly noise but patches are not). Rescaled to roughly unit
    variance like normalized CIFAR. With the defaults a Tiny-ViT's loss falls
    from ~2.3 to below 1 within ~20 steps and keeps improving for ~100.
    """
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(num_classes, NUM_CHANNELS, 4, 4, generator=g)
    templates = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)
    templates = templates / templates.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    templates = templates + 0.5 * torch.randn(num_classes, NUM_CHANNELS, 1, 1, generator=g)
    labels = torch.randint(num_classes, (n,), generator=g)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.5, 1.5, generator=g)
    shifts = torch.randint(-4, 5, (n, 2), generator=g)
    images = templates[labels] * contrast
    for i in range(n):  # 2k small rolls: negligible next to training
        images[i] = torch.roll(images[i], shifts=(int(shifts[i, 0]), int(shifts[i, 1])), dims=(1, 2))
    images = images + noise * torch.randn(n, NUM_CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return images.div_(math.sqrt(1.0 + noise**2)), labels


class CIFAR10DataModule(LightningDataModule):
    """CIFAR-10 from local python-version batch files, or a synthetic stand-in.

    Args:
        data_dir: folder with ``data_batch_1..5`` and ``test_batch`` (or with a
            ``cifar-10-batches-py`` subfolder). ``None``: synthetic data.
            Train = the ``data_batch_*`` files, val = ``test_batch``.
        batch_size: batch size for both loaders.
        num_workers: DataLoader workers.
        synthetic_size: number of synthetic examples; the last eighth is the val split.
        seed: seed of the synthetic data and of the training shuffle order.
    """

    def __init__(
        self,
        data_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        synthetic_size: int = 2048,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.synthetic_size = synthetic_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.data_dir is not None:
            (train_x, train_y), (test_x, test_y) = load_cifar10(self.data_dir)
            self.train_set = _NormalizedUint8Images(train_x, train_y)
            self.val_set = _NormalizedUint8Images(test_x, test_y)
        else:
            images, labels = make_synthetic_cifar(self.synthetic_size, seed=self.seed)
            n_val = max(1, self.synthetic_size // 8)
            self.train_set = TensorDataset(images[:-n_val], labels[:-n_val])
            self.val_set = TensorDataset(images[-n_val:], labels[-n_val:])

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before requesting a dataloader")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)


# --------------------------------------------------------------------------- entry point


def report_command() -> str:
    """How to call ``lightning-stability`` from here: on PATH, next to this Python, or as a module."""
    if shutil.which("lightning-stability"):
        return "lightning-stability"
    beside = Path(sys.executable).parent / "lightning-stability"
    if beside.exists():
        try:
            return str(beside.relative_to(Path.cwd()))
        except ValueError:
            return str(beside)
    return f"{sys.executable} -m lightning_stability.analysis.cli"


def tensorboard_hint(trainer) -> str | None:
    """Where the TensorBoard logs of ``trainer`` went, and the commands to read them."""
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            root = Path(logger.save_dir) / (logger.name or "")
            return (
                f"Logs: {logger.log_dir}\n"
                f"Next, the verdict (report.md: healthy or at risk, which block, what to try):\n"
                f"    {report_command()} report {root}\n"
                f"Curves:  tensorboard --logdir {root}"
            )
    return None


def _misconfiguration(err: BaseException) -> MisconfigurationException | None:
    """The ``MisconfigurationException`` in ``err``'s chain of causes, if any."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, MisconfigurationException):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def innermost_error(message: str) -> str:
    """The innermost ``Parser key "name": reason`` of a jsonargparse message, with its class path.

    jsonargparse explains a bad callback value by every type it tried (the ``list[Callback]``
    union, each class path): the reason that matters is the innermost key and the line after it.
    """
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for i in range(len(lines) - 2, -1, -1):
        if lines[i].startswith('Parser key "') and not lines[i + 1].startswith("Parser key"):
            problems = [ln for ln in lines[:i] if ln.startswith("- Problem with given class_path '")]
            owner = problems[-1].split("'")[1] if problems else None
            reason = f"{lines[i]} {lines[i + 1]}"
            return f"{owner}: {reason}" if owner else reason
    return lines[0] if len(lines) == 1 else message


class OneLineErrorParser(LightningArgumentParser):
    """A bad value ends in one ``error:`` line and a tip, not the 60-line usage block and its story."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:  # jsonargparse's nested parsers raise; only the top level prints
            super().error(message, ex)
        sys.stderr.write(f"error: {innermost_error(message)}\n")
        sys.stderr.write(
            f"tip: {self.prog.replace(' [options]', '')} --help lists the options; "
            "--trainer.callbacks.help CLASS documents a callback\n"
        )
        self.exit(2)


class TinyViTCLI(LightningCLI):
    """``LightningCLI`` whose bad callback/model values end in one line, not a chained traceback.

    jsonargparse checks annotated types while parsing (one line, exit 2), but a value that
    only ``__init__`` rejects (e.g. ``eps_max <= eps_min``) raises while the classes are
    instantiated, wrapped in a long ``ValueError`` chain. Here that ends as ``parser.error``.
    """

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, MisconfigurationException) as err:
            cause = _misconfiguration(err)
            if cause is None:
                raise
            self.parser.error(str(cause))


def main(args: list[str] | None = None) -> LightningCLI:
    cli = TinyViTCLI(
        TinyViT,
        CIFAR10DataModule,
        save_config_kwargs={"overwrite": True},
        parser_class=OneLineErrorParser,
        args=args,
    )
    if cli.subcommand == "fit" and cli.trainer.is_global_zero:
        hint = tensorboard_hint(cli.trainer)
        if hint is not None:
            print(hint, flush=True)
    return cli


if __name__ == "__main__":
    main()
