"""The one exception type that means "the user's input is wrong": the CLI prints its message
as a single line and exits non-zero, with no traceback."""


class LstmgenError(Exception):
    pass
