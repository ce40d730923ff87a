"""Rewards that import fine but fail when called."""

NOT_A_FUNCTION = 3


def score(completions, **kwargs):
    raise ValueError("reward exploded on purpose")


def metric(completions, **kwargs):
    raise ZeroDivisionError("metric exploded on purpose")


async def async_score(completions, **kwargs):
    return [0.0 for _ in completions]


def no_kwargs(completions):
    return [0.0 for _ in completions]
