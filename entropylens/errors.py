"""One exception type for user mistakes: the CLI prints it as one line, exit code 2."""


class UserError(Exception):
    """A mistake the user can fix (bad path, wrong column, bad option); never a bug."""
