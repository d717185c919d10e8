"""The one exception type for mistakes a user can fix (bad config, missing file, wrong name)."""


class KdtoolError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits non-zero.

    Bugs inside kdtool are never wrapped in this class, so they keep their tracebacks.
    """


def number(value: object, name: str, minimum: float | None = None, strict: bool = False) -> float:
    """`value` as a float, or a KdtoolError naming the setting `name` (e.g. 'train.lr').

    `minimum` bounds it from below (`strict`: the bound itself is refused too); NaN is refused.
    """
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise KdtoolError(f"{name}={value} must be a number") from None
    if result != result or (minimum is not None and (result < minimum or (strict and result == minimum))):
        bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
        raise KdtoolError(f"{name}={value} must be a number{bound}")
    return result
