"""Errors a user can act on. Each message says what is wrong, where, and what to do."""

from __future__ import annotations


class RwftError(Exception):
    """Base class: the command line prints these without a traceback."""


class ConfigError(RwftError):
    """A config file or override is wrong (unknown key, wrong type, bad value)."""


class DataError(RwftError):
    """Site data is missing, unreadable or malformed."""


class PluginError(RwftError):
    """A plugin registered something twice, or a name is unknown."""


class WeightsError(RwftError):
    """A weights file is missing, unreadable, or does not fit the architecture."""


class BrokenModelError(RwftError):
    """A model's outputs are NaN or infinite: its weights are broken, and no score of it means anything."""


class PrivacyBudgetExhausted(RwftError):
    """Training more would spend more than the configured differential-privacy (epsilon, delta) budget."""
