"""The shipped recipes: listing them (`lorakit recipes`) and copying one as a starter (`lorakit init`).

In a source checkout they live in recipes/ at the repository root; an installed wheel carries the
same files as lorakit/_recipes.
"""

from __future__ import annotations

from pathlib import Path

from lorakit.errors import LorakitError


def recipes_dir() -> Path:
    package = Path(__file__).resolve().parent.parent  # lorakit/
    for cand in (package / "_recipes", package.parent / "recipes"):
        if cand.is_dir():
            return cand
    raise LorakitError("the shipped recipes are missing from this installation", exit_code=1,
                       hint="reinstall lorakit")


def _description(path: Path) -> str:
    """The first comment line of a recipe is its one-line description."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def list_recipes() -> list[tuple[str, Path, str]]:
    """(name, path, description) of every shipped recipe, sorted by name."""
    return [(p.stem, p, _description(p)) for p in sorted(recipes_dir().glob("*.yaml"))]


def write_starter(preset: str, path: Path, *, force: bool = False) -> Path:
    """Copy the shipped recipe `preset` to `path` (never over an existing file unless force)."""
    from lorakit.runtime.atomic import atomic_write_text

    names = {name: p for name, p, _ in list_recipes()}
    if preset not in names:
        import difflib

        close = difflib.get_close_matches(preset, list(names), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"one of: {', '.join(names)}"
        raise LorakitError(f"--preset: unknown preset {preset!r}", hint=hint)
    if path.exists() and not force:
        raise LorakitError(f"{path} already exists; not overwriting it", hint="pass --force to replace it")
    return atomic_write_text(path, names[preset].read_text(encoding="utf-8"))
