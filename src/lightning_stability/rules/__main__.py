"""``python -m lightning_stability.rules``: print the rule table of docs/RULES.md."""

from lightning_stability.rules.render import rule_table

print(rule_table())
