"""Rule profiles: which definitions the rule filter families use, and how a document passes through them.

- ``datatrove`` (the default): rules_datatrove.py, deciding document for document as datatrove 0.10.1's Gopher,
  C4 and FineWeb filters with its English (spaCy) words. The families run as a datatrove pipeline runs its filters:
  in the order asked for, each on the text the previous one kept (C4 keeps only its kept lines), the first
  rejecting family's first failed rule is the reason, and later families do not see the document.
- ``gopher-paper``: rules.py, the earlier definitions (whitespace words stripped of punctuation, every rule of every
  family checked on the original text, all failures reported); where and why it differs is in quality/README.md.

The family names are the same in both profiles; their thresholds and reason codes are the profile's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from prunefusion.quality import rules, rules_datatrove


@dataclass(frozen=True)
class RuleProfile:
    families: dict[str, type]
    chained: bool  # a datatrove pipeline: first rejection ends it, each family sees the text the previous one kept
    summary: str


RULE_PROFILES: dict[str, RuleProfile] = {
    "datatrove": RuleProfile(rules_datatrove.RULE_FILTERS, chained=True,
                             summary="as datatrove 0.10.1 decides (spaCy words), one pipeline, first reason"),
    "gopher-paper": RuleProfile(rules.RULE_FILTERS, chained=False,
                                summary="whitespace words, every family on the original text, every reason"),
}
DEFAULT_RULE_PROFILE = "datatrove"
FAMILIES = tuple(RULE_PROFILES[DEFAULT_RULE_PROFILE].families)  # datatrove's FineWeb pipeline order
assert all(set(p.families) == set(FAMILIES) for p in RULE_PROFILES.values())


def profile(name: str) -> RuleProfile:
    if name not in RULE_PROFILES:
        raise ValueError(f"unknown rule_profile {name!r}; known: {list(RULE_PROFILES)}")
    return RULE_PROFILES[name]


def build_rules(profile_name: str, names: list[str], thresholds: dict[str, dict[str, float]] | None = None) -> list:
    """The named families of a profile in order, with threshold overrides (ValueError names what is wrong)."""
    return rules.build_families(profile(profile_name).families, names, thresholds)


def apply_rules(profile_name: str, families: list, text: str) -> tuple[list[str], str]:
    """(reason codes, the text after the families) for one document."""
    if not profile(profile_name).chained:
        return [reason for family in families for reason in family.check(text)], text
    for family in families:
        reasons, text = family.apply(text)
        if reasons:
            return reasons, text
    return [], text


def default_thresholds(profile_name: str = DEFAULT_RULE_PROFILE) -> dict[str, float]:
    """"family.threshold" -> default value in a profile, flags as 0/1."""
    return rules.threshold_defaults(profile(profile_name).families)


def all_reason_codes() -> list[str]:
    """Every reason code of every profile's families, each once, the default profile's first."""
    codes = [code for p in RULE_PROFILES.values() for cls in p.families.values() for code in cls.REASON_CODES]
    return list(dict.fromkeys(codes))
