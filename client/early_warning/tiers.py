"""The risk tiers, importable without torch (`edufl client rules` checks rule files with them)."""

from __future__ import annotations

#: Tier names, from least to most at risk.
TIERS: tuple[str, ...] = ("low", "moderate", "high")
