"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class FewstepError(Exception):
    """Bad input from the user (config, paths, files). The message names the problem and the fix."""
