"""The two kinds of failure the CLI distinguishes (DESIGN.md: exit codes).

`ArmlabError` is a user mistake or a refused safety check: the CLI prints its message as one
line and exits 2, never a traceback. Messages name the file, key, column or flag at fault and
say what to do. `RunFailed` is a run that started and failed (a crashed rank, say): exit 1.
"""


class ArmlabError(Exception):
    """Bad input or a refused safety check: one line, exit code 2."""

    exit_code = 2


class RunFailed(Exception):
    """A run (prepare, training, evaluation) started and failed: exit code 1."""

    exit_code = 1


class Stopped(RunFailed):
    """A long command stopped by a signal (Ctrl-C, SIGTERM); the CLI prints its one line and exits
    130. Its message says how to resume."""

    exit_code = 130


class Diverged(RunFailed):
    """A training run whose loss became NaN or infinite: it ended there (state "diverged", exit 1)
    and its message names the step and the last finite loss."""
