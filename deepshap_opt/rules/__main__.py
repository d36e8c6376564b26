"""``python -m deepshap_opt.rules``: print the rule table (docs/rules.md) generated from the spec."""

from __future__ import annotations

import inspect

from . import spec


def markdown() -> str:
    """The op → rule table and each rule's math, straight from :mod:`deepshap_opt.rules.spec`."""
    rules: dict[str, list[str]] = {}
    objs = {}
    for op, rule in spec.OPS.items():
        rules.setdefault(rule.name, []).append(op)
        objs[rule.name] = rule
    lines = ["# Operator rules", "",
             "Generated from `deepshap_opt/rules/spec.py` by `python -m deepshap_opt.rules` (do not edit by hand).",
             "Every backend maps its native ops to these canonical names; an op that the explained input flows "
             "through and that is not listed raises `UnsupportedOperatorError`.", "",
             "| rule | threshold | canonical ops |", "|---|---|---|"]
    for name, ops in rules.items():
        eps = objs[name].eps
        # anchors keep the underscore: GitHub's and mkdocs' slug of "## shapley_pair" is "shapley_pair"
        lines.append(f"| [{name}](#{name}) | {eps:g} | {', '.join(f'`{o}`' for o in ops)} |"
                     if eps else f"| [{name}](#{name}) | — | {', '.join(f'`{o}`' for o in ops)} |")
    lines.append("")
    for name, rule in objs.items():
        lines += [f"## {name}", "", inspect.cleandoc(type(rule).__doc__), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
