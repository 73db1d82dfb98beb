"""Typed exceptions. Every error names the problem and the fix."""


class TLDegeneracyError(Exception):
    """Base class of every error this library raises on purpose."""


class BadInputError(TLDegeneracyError, ValueError):
    """Input that cannot be used as given (tokens out of range, empty data, sequences too long, ...)."""


class UnknownHookError(TLDegeneracyError, KeyError):
    """A hook name the model does not have."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class NonFiniteError(TLDegeneracyError, FloatingPointError):
    """A NaN or inf appeared in an activation, gradient or loss."""


class IncompatibleStatsError(TLDegeneracyError, ValueError):
    """Statistics that cannot be merged or resumed (different model, sites or settings)."""


class SamplerDivergedError(TLDegeneracyError, FloatingPointError):
    """An SGLD chain diverged or produced NaN; lower the step size."""


class CorruptFileError(BadInputError):
    """A result or input file that cannot be read back as written: truncated, bit-flipped, not safetensors,
    not JSON, or failing its checksum."""


class FormatVersionError(BadInputError):
    """A file written in a newer format than this installation reads; the message names the version to install."""


class RunFolderError(BadInputError):
    """A run folder that is not ours (someone else's files), or is in use by another run."""
