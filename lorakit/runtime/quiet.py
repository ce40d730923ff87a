"""Library noise off: transformers/TRL/datasets log errors only, no progress bars of their own."""

from __future__ import annotations

import logging
import os
import warnings


def progress_bars_off() -> None:
    """CI mode: every tqdm bar off through tqdm's and the hub's own switches (TQDM_DISABLE,
    HF_HUB_DISABLE_PROGRESS_BARS). tqdm reads its switch when first imported, so this runs at CLI start;
    it covers bars the libraries draw with plain tqdm, such as transformers' GGUF conversion."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


NOISY_LOGGERS = ("bitsandbytes", "liger_kernel")


def quiet_from_start() -> None:
    """At CLI start (not with --debug), before any library is imported: what libraries log or warn on import or
    along the way stays off the user's terminal. bitsandbytes logs on import that the optional `kernels` package
    is missing ("Failed to load CPU gemm_4bit_forward from kernels-community"); torch, transformers, peft and
    TRL raise UserWarnings / FutureWarnings about their own internals. lorakit's own warnings still show;
    transformers / datasets log errors only (their verbosity variables, read on import)."""
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    warnings.filterwarnings("default", module=r"lorakit(\.|$)")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")


def quiet_libraries() -> None:
    """Keep transformers/TRL/datasets to errors, no progress bars of their own, no deprecation noise."""
    from transformers.utils import logging as hf_logging  # torch-free at import: the CLI imports this module

    # bitsandbytes' CPU backend warns on import when the optional `kernels` package (a faster CPU 4-bit gemm
    # from the hub) is missing, and falls back on its own kernel; liger-kernel logs each optional backend it
    # cannot import (CuTe DSL, Ascend) on every CUDA run. Neither is something the user can act on.
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)

    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*deprecated.*")

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:  # inside for the same reason; datasets may be absent
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass
