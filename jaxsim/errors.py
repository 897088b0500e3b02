"""Errors raised for bad user input.

Every error names *where* the problem is (a file, a line, a config field) and *what to do*,
so that a user never has to read a traceback to fix an input.
"""


class JaxsimInputError(ValueError):
    """Bad user input: a config field, a trace line, a profile table or a model config."""

    def __init__(self, where: str, problem: str, fix: str = ""):
        self.where = where
        self.problem = problem
        self.fix = fix
        message = f"{where}: {problem}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


def unknown_key_fix(name: str, known) -> str:
    """The fix for an unknown key ``name``: the nearest known names (a typo's likely intent), then
    the full list."""
    import difflib

    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(str(name), known, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}known: {', '.join(known)}"


class CapacityOverflowError(RuntimeError):
    """A fixed-capacity array of the simulator would have overflowed; results would be wrong."""
