"""The one kind of failure a user should see as a single line (exit code 2)."""


class UserError(Exception):
    """Bad input or settings: printed as ``error: <message>`` and the script exits with code 2."""


class SettingError(UserError):
    """One setting's value cannot work. The library names the setting by its Python name
    (``SettingError("damping", "must be > 0, got -1")`` reads ``damping: must be > 0, got -1``); a
    command-line script shows its flag instead (``--damping: must be > 0, got -1``, :mod:`influence.cli`).

    Library messages never spell a command-line flag: other settings a hint mentions are named the
    Python way too (``raise damping``), which reads the same to a user of either face.
    """

    def __init__(self, setting, message):
        self.setting = str(setting)
        self.message = str(message)
        super().__init__(f"{self.setting}: {self.message}")

    def for_flags(self, flags):
        """The message with the setting shown as its flag, from ``flags`` (setting -> ``--flag``)."""
        return f"{flags.get(self.setting, self.setting)}: {self.message}"
