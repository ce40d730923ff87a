"""`--resume` with an optional value, which click cannot parse: the bare flag is rewritten before click sees it.

`lorakit train R.yaml --resume`, `--resume RUN_DIR`, `--resume --set k=v`, `--set k=v --resume`,
`--resume R.yaml`: click would take whatever follows `--resume` as its value (`--set`, the recipe) or, at the
end of the line, refuse the missing value. Here a `--resume` followed by nothing, by an option, or by a file
(the recipe: an existing file, or a name ending in .yaml/.yml) becomes `--resume=latest`; any other word after
it is the run directory. `--resume=VALUE` is left as written.
"""

from __future__ import annotations

from pathlib import Path

BARE = "latest"  # lorakit.train.run's value for "the recipe's own output directory"
_GLOBAL = ("--debug", "--version", "-h", "--help")


def _names_the_recipe(word: str) -> bool:
    path = Path(word)
    return path.is_file() or (path.suffix.lower() in (".yaml", ".yml") and not path.is_dir())


def normalize(argv: list[str]) -> list[str]:
    """`argv` (without the program name) with a bare `--resume` of `train` written as `--resume=latest`.

    Args:
        argv: the command line after the program name.

    Returns:
        A new list; unchanged unless the command is `train` and it has `--resume`.
    """
    args = list(argv)
    start = next((i for i, a in enumerate(args) if a not in _GLOBAL), len(args))
    if start >= len(args) or args[start] != "train":
        return args
    out, i = args[: start + 1], start + 1
    while i < len(args):
        word = args[i]
        if word == "--":  # everything after it is positional
            out += args[i:]
            break
        if word != "--resume":
            out.append(word)
            i += 1
            continue
        value = args[i + 1] if i + 1 < len(args) else None
        if value is None or value.startswith("-") or _names_the_recipe(value):
            out.append(f"--resume={BARE}")
            i += 1
        else:  # a run directory ("latest" as a directory name is spelled as a path)
            out.append(f"--resume={'./' + value if value == BARE else value}")
            i += 2
    return out
