"""Typed errors raised by the library.

Every message is one line that names the problem and, where there is one, the fix.
The CLI turns these into ``Error: …`` and exit code 1 at its edge; library code never
prints or exits.
"""


class PyactaddError(Exception):
    """Base class for every error pyactadd raises on purpose."""


class InstallError(PyactaddError):
    """The installed llama-cpp-python or the compiled engine does not match what pyactadd was built for."""


class InputError(PyactaddError):
    """A user-supplied value (prompt, layer, coefficient, alignment, path) is invalid."""


class SteeringFileError(PyactaddError):
    """A steering file is missing, unreadable, corrupt, or holds invalid numbers."""


class ModelMismatchError(PyactaddError):
    """A steering vector was made for a model that differs from the one it is applied to."""


class EngineError(PyactaddError):
    """The C++ steering engine refused a request or reported a failure."""
