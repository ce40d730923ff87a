"""`lorakit estimate --max-context`: the longest row an SFT recipe trains at batch 1 within a memory budget.

The answer is the estimate's own: for each candidate length the recipe is planned and forecast as `lorakit
train` would run it at batch 1 on a GPU of the budget's size (the levers can change with the length: CUDA
graphs' pool; the tiled MLP where the row would not fit without it; offloaded layer inputs within the host's
memory where known), doubling from RESOLUTION until the forecast no longer fits, then bisecting to a
multiple of RESOLUTION. No torch: the budget is a number (a GPU name's memory, or --budget).
"""

from __future__ import annotations

from lorakit.errors import LorakitError
from lorakit.estimate.memory import estimate

RESOLUTION = 1024  # tokens: the answer is a multiple of this
LIMIT = 1 << 22  # tokens: a longer row is not searched for


def at_length(recipe, tokens: int):
    """`recipe` with one row of `tokens` tokens a micro-batch (train.batch_size 1, data.max_length)."""
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"batch_size": 1}),
                                     "data": recipe.data.model_copy(update={"max_length": tokens})})


def longest_row(recipe, *, budget_bytes: int, device: str = "cuda", host_bytes: float | None = float("inf")) -> dict:
    """The largest data.max_length (a multiple of RESOLUTION) whose estimated peak at batch 1 fits the budget.

    Args:
        recipe: a validated SFT Recipe.
        budget_bytes: the device memory to fit (a GPU's, or the user's budget).
        device: the device the run trains on ("cuda": the levers lorakit picks on a GPU).
        host_bytes: the host memory offloaded checkpoints may use (None: this machine's; default: no limit).

    Returns:
        {"max_context": tokens or 0 when not even RESOLUTION tokens fit, "budget_bytes", "peak_bytes" (the
        forecast at that length), "setup" (the estimate's levers there), "limited_by": "memory" or "search limit"}.
    """
    if recipe.method != "sft":
        raise LorakitError("--max-context: the longest row is for SFT recipes (a GRPO row is its prompt and "
                           "completion lengths: grpo.max_prompt_length + grpo.max_completion_length)",
                           field="--max-context")
    cache: dict[int, dict] = {}

    def forecast(tokens: int) -> dict:
        if tokens not in cache:
            cache[tokens] = estimate(at_length(recipe, tokens), device=device, host_bytes=host_bytes,
                                     device_bytes=budget_bytes)
        return cache[tokens]

    def fits(tokens: int) -> bool:
        return forecast(tokens)["memory"]["peak_bytes"] <= budget_bytes

    lo, hi = 0, RESOLUTION  # lo fits (0: nothing yet), hi is the next candidate
    while hi <= LIMIT and fits(hi):
        lo, hi = hi, hi * 2
    limited = "search limit" if hi > LIMIT else "memory"
    hi = min(hi, LIMIT + RESOLUTION)
    while hi - lo > RESOLUTION:  # lo fits, hi does not
        mid = (lo + hi) // 2 // RESOLUTION * RESOLUTION
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    out = {"max_context": lo, "budget_bytes": int(budget_bytes), "limited_by": limited}
    if lo:
        r = forecast(lo)
        out.update(peak_bytes=r["memory"]["peak_bytes"], setup=r["setup"], memory=r["memory"])
    return out
