"""User-facing errors: bad input that the command line reports in one line and exits non-zero."""


class UserError(Exception):
    """A problem with the user's input (config, data, workdir); the message is shown as is."""
