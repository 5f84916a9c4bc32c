"""The one error of the launcher: a config value that is wrong, named by its dotted key."""

from __future__ import annotations


class ConfigError(ValueError):
    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        where = f"{source}: " if source else ""
        what = f"{key}: " if key else ""  # no key: the file itself (unreadable, not YAML)
        super().__init__(f"{where}{what}{message}")
