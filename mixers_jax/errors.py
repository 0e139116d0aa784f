"""Outcomes the command line reports in one line (see mixers_jax/cli.py for the exit statuses)."""


class UserError(Exception):
    """A problem with the user's input (flag, config, data, workdir); the message is shown as is.

    Exit status 2."""


class Preempted(Exception):
    """A run stopped early on request (SIGTERM, Ctrl-C) after saving a checkpoint; rerunning the
    same command resumes it. The message says what was saved. Exit status 75."""
