"""The held-out scenarios: each failing run and its one-difference control, and the long healthy runs.

The knob of each mechanism (a learning rate, an ε, an architecture switch) was chosen on seed 100
by ``examples/heldout/tune.py``, looking at the loss events only; the evaluation uses seeds 0–4.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from heldout.runner import RunSpec


@dataclass(frozen=True)
class Scenario:
    """A failing configuration and its control, which differs in exactly one setting.

    Attributes:
        name: ``<family>_<mechanism>``.
        family: model family.
        mechanism: what the knob provokes, with its source.
        whatif: the low precision the monitor measures.
        arch: config overrides shared by both arms.
        optim: optimizer settings shared by both arms.
        fail: the failing arm's one setting, ``{"arch"|"optim": {key: value}}``.
        control: the control's value of that setting.
        steps: optimizer steps.
        expect: whether a forward-precision alarm has anything to see (``False``: the mechanism is
            outside what the alarm measures; its silence is right and its firing a false claim).
    """

    name: str
    family: str
    mechanism: str
    whatif: str
    arch: dict[str, Any] = field(default_factory=dict)
    optim: dict[str, Any] = field(default_factory=dict)
    fail: dict[str, dict[str, Any]] = field(default_factory=dict)
    control: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: int = 300
    expect: bool = True

    def spec(self, arm: str, seed: int, quick: bool = False) -> RunSpec:
        """The :class:`RunSpec` of one arm (``"fail"`` or ``"control"``) and seed."""
        diff = self.fail if arm == "fail" else self.control
        arch = {**self.arch, **diff.get("arch", {})}
        optim = {"warmup_steps": 20, **self.optim, **diff.get("optim", {})}
        steps = self.steps
        if quick:
            arch.update(QUICK_ARCH)
            steps = QUICK_STEPS
        return RunSpec(self.name, arm, seed, self.family, arch, optim, self.whatif, steps)


#: --quick: the smallest models and a few steps (CI: the pipeline end to end, not the evidence)
QUICK_ARCH = {"d": 32, "layers": 2, "heads": 2, "seq_len": 16}
QUICK_STEPS = 12

SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "llama_logit_growth",
            "llama",
            "attention-logit growth at a high learning rate without qk-norm (Wortsman et al. 2023; "
            "Dehghani et al. 2023); control: qk-norm (Qwen3 = Llama + per-head q/k RMSNorm)",
            "bf16",
            arch={"seq_len": 64},
            optim={"lr": 0.1},
            fail={"arch": {"qk_norm": False}},
            control={"arch": {"qk_norm": True}},
        ),
        Scenario(
            "gpt_output_logits",
            "gpt",
            "output-logit divergence without weight decay at a high learning rate, qk-norm on "
            "(Wortsman et al. 2023, §3.2); control: z-loss 1e-4",
            "bf16",
            arch={"seq_len": 64, "qk_norm": True},
            optim={"lr": 0.2},
            fail={"optim": {"z_loss": 0.0}},
            control={"optim": {"z_loss": 1e-4}},
        ),
        Scenario(
            "vit_fp16_overflow",
            "vit",
            "activation growth to FP16 overflow at a high learning rate (pre-LN ViT on digits, "
            "100 warmup steps); control: a 30x lower learning rate, the largest without an event "
            "in 600 steps on seed 100",
            "fp16",
            arch={"layers": 4},
            optim={"warmup_steps": 100},
            fail={"optim": {"lr": 0.3}},
            control={"optim": {"lr": 0.01}},
        ),
        Scenario(
            "bert_eps_norm",
            "bert",
            "ε-dominated normalization: post-LN encoder whose LayerNorm ε is 1 (ρ_LN < 1 for "
            "unit-variance inputs, SPEC §2); control: BERT's ε = 1e-12",
            "fp16",
            arch={"seq_len": 64},
            optim={"lr": 1e-3},
            fail={"arch": {"norm_eps": 1.0}},
            control={"arch": {"norm_eps": 1e-12}},
        ),
        Scenario(
            "llama_adam_eps",
            "llama",
            "AdamW ε comparable to the gradient RMS, which damps the updates (Wortsman et al. 2023, "
            "§3.4); an optimizer problem, not a forward-precision one; control: ε = 1e-8",
            "bf16",
            arch={"seq_len": 64},
            optim={"lr": 1e-3},
            fail={"optim": {"adam_eps": 1e-2}},
            control={"optim": {"adam_eps": 1e-8}},
            expect=False,
        ),
    ]
}

#: Long healthy runs: each family at an ordinary learning rate, FP16 measured (all three parts of the
#: rule apply), sampled every 5 steps.
HEALTHY_STEPS = 1000
HEALTHY_EVERY = 5
HEALTHY: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "healthy_gpt": ("gpt", {"seq_len": 64}, {"lr": 1e-3}),
    "healthy_llama": ("llama", {"seq_len": 64}, {"lr": 1e-3}),
    "healthy_vit": ("vit", {"layers": 4}, {"lr": 1e-3}),
    "healthy_bert": ("bert", {"seq_len": 64}, {"lr": 1e-3}),
}


def healthy_spec(name: str, seed: int, quick: bool = False) -> RunSpec:
    """The long healthy run of ``name`` (a key of :data:`HEALTHY`) for ``seed``."""
    family, arch, optim = HEALTHY[name]
    arch, optim = dict(arch), {"warmup_steps": 20, **optim}
    steps, every = HEALTHY_STEPS, HEALTHY_EVERY
    if quick:
        arch.update(QUICK_ARCH)
        steps, every = QUICK_STEPS, 2
    return RunSpec(name, "healthy", seed, family, arch, optim, "fp16", steps, every_n_steps=every)
