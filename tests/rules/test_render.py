"""The words: the rule table page matches the rules, the texts carry the status, the rule and its block."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_stability.rules import RULES, Evidence, Judge, rule_book
from lightning_stability.rules.render import (
    KappaLead,
    alarm_reason,
    condition,
    paragraph,
    precision_name,
    rule_table,
    summary,
)

ROOT = Path(__file__).resolve().parents[2]
BF16 = 2.0**-7


def test_rules_page_lists_the_table_generated_from_the_rules() -> None:
    text = (ROOT / "docs" / "RULES.md").read_text()
    m = re.search(r"<!-- rules-table:start[^>]*-->\n(.*?)\n<!-- rules-table:end -->", text, re.S)
    assert m, "docs/RULES.md has no generated rule table"
    assert m.group(1) == rule_table(), "regenerate with `python scripts/sync_rule_docs.py`"
    for rule in RULES:
        assert f"| `{rule.name}` |" in m.group(1)


def _judged(*steps: dict[str, float]) -> Judge:
    judge = Judge(rule_book("default"))
    for i, tags in enumerate(steps):
        judge.observe(Evidence.from_tags({"stability/eps_mach": BF16, **tags}, 5 * i + 4, ["h.0", "h.1"]))
    return judge


def test_summary_and_paragraph_carry_status_rule_block_and_advice() -> None:
    quiet = {"stability/block0/r_local": 1e-3, "stability/block1/r_local": 2e-3}
    hot = {**quiet, "stability/block1/attn_logit_max": 164.3}
    j = _judged(quiet, hot).judgement()
    text = summary(j)
    assert (
        text.splitlines()[0]
        == "StabilityMonitor verdict: watch (2 sampled step(s), low precision BF16, ε_mach = 0.0078)"
    )
    assert (
        "- largest attention logit: 164.3 in h.1 (block 1) at step 9 — watch: attn_logit_max 164.3 > 100"
        in text
    )
    assert (
        'early warning (alarm.rule="default") fired at steps 9; first: attn_logit_max>100 in block 1' in text
    )
    assert text.endswith(
        "What to try:\n- qk-norm, or QK-clip at τ = 100, for the attention of h.1 (block 1)."
    )
    lines = paragraph(j, "run")
    assert lines[0].startswith("**run — watch** (2 logged steps, BF16, ε_mach = 0.0078). Findings: largest")
    assert lines[-1] == "What to try: qk-norm, or QK-clip at τ = 100, for the attention of h.1 (block 1)."
    healthy = _judged(quiet).judgement()
    assert summary(healthy).splitlines()[0].startswith("StabilityMonitor verdict: healthy")
    assert paragraph(healthy, "run")[-1].startswith("What to try: nothing is needed at this precision.")


def test_the_kappa_softmax_sentence_speaks_of_kappa_softmax_only_and_only_when_given() -> None:
    j = _judged({"stability/block0/r_local": 1e-3, "stability/block0/attn_logit_max": 164.3}).judgement()
    assert not any("κ_softmax" in line for line in paragraph(j, "run"))
    no_lead = KappaLead(
        60, 1.0, False, "no lead: the best lag (60 steps) sits at the edge of the ±60-step scan"
    )
    text = " ".join(paragraph(j, "run", no_lead))
    assert "κ_softmax (the paper's early-warning signal) shows no lead over the mismatch in this run" in text
    assert "noise" not in text and "its warnings" not in text  # the default alarm is not about κ_softmax
    leads = " ".join(paragraph(j, "run", KappaLead(17, 0.005, True, "κ_softmax leads fwd error by 17 steps")))
    assert "leads the mismatch by 17 steps in this run (p 0.005)." in leads


def test_small_phrases() -> None:
    rules = {r.name: r for r in RULES}
    assert condition(rules["r_local"], 25.6, 10.0) == "r_local 25.6 × ε_mach > 10 × ε_mach"
    assert condition(rules["fp16_headroom"], 0.5, 1.0) == "fp16_headroom 0.5 bits < 1 bits"
    assert condition(rules["kappa_softmax_z"], 3.2, 1.5) == "z(kappa_softmax_max) 3.2 > 1.5"
    j = _judged({"stability/block1/attn_logit_max": 164.3}).judgement()
    assert j.alarm.first is not None
    assert alarm_reason(j.alarm.first, "h.1") == "attn_logit_max>100 in block 1 ('h.1') (value 164.3)"
    assert [precision_name(e) for e in (2.0**-7, 2.0**-10, 2.0**-23, 2.0**-8, None)] == [
        "BF16",
        "FP16",
        "FP32",
        "ε_mach 3.91e-03",
        "unknown precision",
    ]
