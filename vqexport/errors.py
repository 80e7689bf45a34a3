"""Errors a user can cause (exit 2) and parity failures (exit 1).

Anything else that escapes is a bug and keeps its traceback.
"""


class VQExportError(Exception):
    """A problem with the user's input: one clear line, exit code 2."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class ParityError(Exception):
    """The target's outputs do not match the PyTorch reference: exit code 1."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
