"""A reward file whose import fails: it needs a package that is not installed."""
import lorakit_no_such_package_xyz  # noqa: F401


def score(completions, **kwargs):
    return [0.0 for _ in completions]
