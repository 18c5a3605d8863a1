"""The one exception type that means "the user's input is wrong", and the one line a user sees
for any error: the CLI prints it and exits non-zero, with no traceback. Ray wraps what fails on a
worker, an actor or its controller, so the line is dug out from inside Ray's wrappers here."""

from __future__ import annotations


class LstmgenError(Exception):
    pass


def _causes(exc: BaseException):
    """The exception and everything wrapped inside it: Ray task, actor, controller and worker
    failures, and Python's own chaining. Outermost first."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for attr in ("cause", "controller_failure"):
            inner = getattr(e, attr, None)
            if isinstance(inner, BaseException):
                stack.append(inner)
        failures = getattr(e, "worker_failures", None)
        if isinstance(failures, dict):
            stack.extend(v for v in failures.values() if isinstance(v, BaseException))
        stack.extend([e.__cause__, e.__context__])


def error_line(exc: BaseException) -> str:
    """One line for the user: the first LstmgenError inside Ray's wrappers, else the innermost
    exception with its first line (a wrapper's own message says only that something failed)."""
    chain = list(_causes(exc))
    for e in chain:
        if type(e) is LstmgenError or (isinstance(e, LstmgenError) and not hasattr(e, "cause")):
            return str(e)
    for e in chain:
        cause = getattr(e, "cause", None)
        if isinstance(cause, LstmgenError):
            return str(cause)
    inner = chain[-1]
    text = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")
    prefix = "training failed: " if any(type(e).__name__.endswith(("ControllerError", "WorkerGroupError")) for e in chain) else ""
    return f"{prefix}{type(inner).__name__}: {text}"
