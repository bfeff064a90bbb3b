"""QK-clip at every optimizer step for the blocks ``StabilityGuard`` has armed (MuonClip's schedule).

A block is armed when the guard first QK-clips it at a sampled step. From then on every training
forward of the block is watched (:class:`~lightning_stability.capture.logit_watch.HeadLogitWatch`)
and, after each optimizer step, the heads whose largest logit in that forward passed ``τ`` are
rescaled (:meth:`~lightning_stability.mitigations.QKClip.clip_by`). Under DDP the ranks first
exchange what each watch saw (two small collectives per step, every rank in the same block order):
the per-head maxima are reduced by a maximum over the ranks, so every rank rescales the same heads
by the same factors, and a block whose watch failed on any rank stops on every rank.

A compiled model cannot be watched (``torch.compile`` never runs hooks added after it traced a
forward, and cannot trace the watch's own): such a block is not armed, or stops, and says so once;
so does an armed block no training forward of which is seen at two optimizer steps in a row.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn

from lightning_stability.callbacks._common import is_distributed
from lightning_stability.capture.logit_watch import COMPILED
from lightning_stability.capture.structure import Block
from lightning_stability.mitigations import QKClip, qk_clip_factors

#: A block's status in the exchange when its watch failed (else its number of maxima, 0 when nothing watched).
_FAILED = -1
#: Optimizer steps in a row without a watched training forward after which an armed block stops.
MAX_UNSEEN_STEPS = 2
_UNSEEN = (
    f"no training forward of the block was seen at {MAX_UNSEEN_STEPS} optimizer steps in a row "
    "(is the model compiled? torch.compile does not run hooks added after it traced a forward)"
)


def is_compiled(model: nn.Module, block: nn.Module) -> bool:
    """Whether ``block`` of ``model`` runs through ``torch.compile``: the model's forward, the block,
    a module holding it, or one inside it is compiled (a compiled classifier head does not count)."""
    if getattr(model, "_compiler_ctx", None):  # Lightning's record of a compiled LightningModule
        return True
    inside = {id(m) for m in block.modules()}
    compiled = (
        m
        for m in model.modules()
        if isinstance(m, torch._dynamo.eval_frame.OptimizedModule) or getattr(m, "_compiled_call_impl", None)
    )
    return any(id(m) in inside or any(sub is block for sub in m.modules()) for m in compiled)


def own_clips(clips: dict[str, QKClip], blocks: dict[str, Block]) -> dict[str, QKClip]:
    """The clips of ``clips`` that act on ``blocks`` (a guard fitting another model drops the others:
    clipping, or watching, a block of a model not being trained would leave this one unclipped)."""
    return {n: c for n, c in clips.items() if n in blocks and c.block.module is blocks[n].module}


class ArmedClips:
    """The armed blocks of one guard: their :class:`QKClip`, how often they clipped, their largest logit.

    A block whose watch fails is disarmed and said once; it is not armed again and goes back to
    being QK-clipped at the monitor's sampled steps.

    Attributes:
        clips: block name → its QK-clip, armed.
        steps_clipped: block name → optimizer steps at which a head was rescaled.
        max_seen: block name → the largest training-forward logit seen while armed (before clipping).
        failed: blocks whose watch failed.
    """

    def __init__(self) -> None:
        self.clips: dict[str, QKClip] = {}
        self.steps_clipped: dict[str, int] = {}
        self.max_seen: dict[str, float] = {}
        self.failed: set[str] = set()
        self._last_step = -1
        self._unseen: dict[str, int] = {}

    def can_arm(self, name: str) -> bool:
        """Whether ``name`` may be armed (not armed yet, not refused or failed before)."""
        return name not in self.clips and name not in self.failed

    def arm(self, name: str, clip: QKClip, model: nn.Module) -> None:
        """Watch ``clip``'s block (of ``model``) from its next training forward on.

        Raises:
            ValueError: as :meth:`QKClip.arm`, or when ``model`` runs compiled; the block is then
                not armed again (the caller says so once).
        """
        try:
            if is_compiled(model, clip.block.module):
                raise ValueError(f"{COMPILED}; compile it after the fit, or leave qk_clip_every_step off")
            clip.arm()
        except ValueError:
            self.failed.add(name)
            raise
        self.clips[name] = clip
        self._unseen[name] = -1  # the step it is armed at has no watched forward yet
        self.steps_clipped.setdefault(name, 0)

    def disarm_all(self) -> None:
        """Remove every watch's hooks (the record stays; :meth:`rearm` puts them back)."""
        for clip in self.clips.values():
            clip.disarm()

    def rearm(self, model: nn.Module | None) -> None:
        """Watch every block of the record (blocks of ``model``) again: a new fit, a resumed run."""
        for name, clip in list(self.clips.items()):
            try:
                if model is not None and is_compiled(model, clip.block.module):
                    raise ValueError(COMPILED)
                clip.arm()
                self._unseen[name] = 0
            except ValueError as err:
                self._stop(name, str(err))

    def step(self, trainer: Trainer, index: dict[str, int]) -> dict[str, float]:
        """After an optimizer step: clip every armed block by its training forward's per-head maxima.

        Returns the tags to log: per armed block (``index``: its block index)
        ``block{i}/train_logit_max`` (the largest logit of the step's training forward, before
        clipping) and, when a head was rescaled, ``block{i}/qk_clip`` (the smallest ``η``).
        """
        if not self.clips or trainer.global_step == self._last_step:
            return {}
        self._last_step = trainer.global_step
        names = sorted(self.clips)  # one order on every rank: the collectives pair up
        maxima, failures = _exchange(trainer, [self.clips[n] for n in names])
        metrics: dict[str, float] = {}
        for name, values, failure in zip(names, maxima, failures, strict=True):
            unseen = self._unseen.get(name, 0) + 1 if values is None else 0
            self._unseen[name] = unseen
            if failure is None and unseen >= MAX_UNSEEN_STEPS:
                failure = _UNSEEN
            if failure is not None:
                self._stop(name, failure)
                continue
            clip, i = self.clips[name], index.get(name, -1)
            try:
                done = clip.clip_by(values)
            except Exception as err:  # the guard never stops training
                self._stop(name, f"{type(err).__name__}: {err}")
                continue
            if done is None:
                continue
            seen, clipped = done
            top = max((v for v in seen if math.isfinite(v)), default=0.0)
            metrics[f"block{i}/train_logit_max"] = top
            self.max_seen[name] = max(self.max_seen.get(name, 0.0), top)
            if any(clipped.values()):
                self.steps_clipped[name] = self.steps_clipped.get(name, 0) + 1
                metrics[f"block{i}/qk_clip"] = min(qk_clip_factors(seen, clip.tau))
        return metrics

    def _stop(self, name: str, reason: str) -> None:
        """Stop clipping one block at every step, said once: it is clipped at sampled steps again."""
        if name not in self.failed:
            rank_zero_warn(
                f"StabilityGuard: QK-clip at every step stopped in block {name!r} ({reason}); "
                "the block is QK-clipped at the monitor's sampled steps again."
            )
        self.failed.add(name)
        clip = self.clips.pop(name, None)
        if clip is not None:
            clip.disarm()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The record: armed and failed blocks, clip counts, largest logits (JSON-able)."""
        return {
            "armed": sorted(self.clips),
            "steps_clipped": dict(self.steps_clipped),
            "max_seen": dict(self.max_seen),
            "failed": sorted(self.failed),
        }

    def load_state_dict(self, state: dict[str, Any], clips: dict[str, QKClip]) -> None:
        """Adopt a record; ``clips`` holds the QK-clip of each block armed in it (disarmed here)."""
        self.disarm_all()
        self.clips = dict(clips)
        self.steps_clipped = {k: int(v) for k, v in state.get("steps_clipped", {}).items()}
        self.max_seen = {k: float(v) for k, v in state.get("max_seen", {}).items()}
        self.failed = set(state.get("failed", []))
        self._last_step, self._unseen = -1, {}


#: One block's per-head maxima since the last step, per attention of the block (HeadLogitWatch.take_each).
Maxima = dict[str, Tensor]


def _local(clip: QKClip) -> tuple[Maxima | None, str | None]:
    """One block's per-head maxima since the last step on this process, or why there are none."""
    watch = clip.watch
    if watch is None:
        return None, "not watched"
    if watch.error is not None:
        return None, watch.error
    return watch.take_each() or None, None


def _exchange(trainer: Trainer, clips: list[QKClip]) -> tuple[list[Maxima | None], list[str | None]]:
    """Per block: the per-head maxima to clip by (the maximum over every rank's), and a failure if any.

    Without DDP these are the local ones. Under DDP every rank calls this with the same blocks in
    the same order: first the status of each block (its number of maxima, nothing watched, failed)
    is gathered — a block that failed on any rank fails on all, a block whose counts differ or that
    some rank did not watch is skipped on all — then the maxima of the blocks all ranks watched
    alike, reduced by a maximum (each block's attentions in name order).
    """
    local = [_local(c) for c in clips]
    maxima = [m for m, _ in local]
    failures = [f for _, f in local]
    if not is_distributed(trainer):
        return maxima, failures
    sizes = [0 if m is None else sum(t.numel() for t in m.values()) for m in maxima]
    status = [_FAILED if f is not None else n for n, f in zip(sizes, failures, strict=True)]
    device = trainer.strategy.root_device  # NCCL gathers tensors of the process's device only
    every = trainer.strategy.all_gather(torch.tensor(status, dtype=torch.int64, device=device))
    every = every.reshape(-1, len(clips)).cpu()
    failures = [
        failures[j] or ("failed on another process" if bool((every[:, j] == _FAILED).any()) else None)
        for j in range(len(clips))
    ]
    agreed = [
        failures[j] is None and bool((every[:, j] == every[0, j]).all()) and int(every[0, j]) > 0
        for j in range(len(clips))
    ]
    parts = [m[k].double() for m, ok in zip(maxima, agreed, strict=True) if ok and m for k in sorted(m)]
    if not parts:
        return [None] * len(clips), failures
    flat = torch.cat(parts).to(device)
    reduced = trainer.strategy.all_gather(flat).reshape(-1, flat.numel()).cpu().amax(dim=0)
    out: list[Maxima | None] = []
    offset = 0
    for m, ok in zip(maxima, agreed, strict=True):
        if not ok or not m:
            out.append(None)
            continue
        block: Maxima = {}
        for k in sorted(m):
            block[k] = reduced[offset : offset + m[k].numel()]
            offset += m[k].numel()
        out.append(block)
    return out, failures
