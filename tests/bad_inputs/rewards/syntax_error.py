"""A reward file with a syntax error."""


def score(completions, **kwargs)
    return [0.0 for _ in completions]
