"""Typed errors of the library. The CLI turns each into one line on stderr and a non-zero exit."""


class FlashError(Exception):
    """Base class: anything a user can cause and should read about in one line."""


class BadModelFile(FlashError):
    """Missing, unreadable, truncated or corrupt model file."""


class UnsupportedModel(FlashError):
    """A valid GGUF whose architecture, tensor type or shape flashcli does not run."""


class BudgetTooSmall(FlashError):
    """The --dram-budget cannot hold the resident part of the model."""


class OutputExists(FlashError):
    """Refusing to overwrite an existing output without --force."""


class DiskFull(FlashError):
    """Not enough free space for the output."""


class ContextFull(FlashError):
    """A message that does not fit the context, even with the earlier turns dropped."""


class NoGpu(FlashError):
    """--gpu where no CUDA backend or device is there: a usage error (exit status 2)."""

    exit_code = 2
