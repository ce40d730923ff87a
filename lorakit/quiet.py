"""Library noise off: transformers/TRL/datasets log errors only, no progress bars of their own."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Keep transformers/TRL/datasets to errors, no progress bars of their own, no deprecation noise."""
    import warnings

    from transformers.utils import logging as hf_logging

    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated.*")

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass
