"""Policy: locks, allows, denies and boosts that override measured selection."""

from .model import Policy, Rule

__all__ = ["Policy", "Rule"]
