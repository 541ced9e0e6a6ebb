"""One error type for every user-facing failure: the CLI prints its message on one line and exits 2."""


class ConceptlensError(Exception):
    """A problem with the user's input or environment, described in one line."""
