"""The user-facing error type and its rendering.

Every problem a user can cause (a bad recipe, a missing file, a target module that does not
exist) is raised as a `LorakitError`. The CLI catches it, prints the message (and the hint) in one
paragraph and exits with its code: 2 for bad input, 1 for runtime failures. Nothing else prints a
traceback unless `--debug` is given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_INPUT = 2
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


def signal_exit_code(signal_name: str | None) -> int:
    """The shell's exit code for a run stopped by `signal_name`: 143 for SIGTERM, else 130 (SIGINT)."""
    return EXIT_SIGTERM if signal_name == "SIGTERM" else EXIT_SIGINT


@dataclass
class Problem:
    """One problem in a recipe: where it is and what is wrong."""

    field: str  # dotted path, e.g. "lora.r"
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def render(self) -> str:
        where = ""
        if self.file:
            where = self.file
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
            where += "  "
        name = f"{self.field}: " if self.field else ""
        return f"{where}{name}{self.message}"


class LorakitError(Exception):
    """An error the user can fix. `exit_code` 2 = bad input, 1 = runtime failure."""

    def __init__(self, message: str, *, hint: str | None = None, exit_code: int = EXIT_INPUT,
                 problems: list[Problem] | None = None, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.exit_code = exit_code
        self.problems = problems or []
        self.field = field  # dotted recipe field this error is about; recipe.located() adds its line

    def render(self) -> str:
        lines = [self.message]
        lines += [f"  {p.render()}" for p in self.problems]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "error": self.message,
            "hint": self.hint,
            "exit_code": self.exit_code,
            "field": self.field,
            "problems": [p.__dict__ for p in self.problems],
        }


class RecipeError(LorakitError):
    """One or more problems in a recipe file, each with its line."""

    def __init__(self, problems: list[Problem], *, source: str | None = None):
        n = len(problems)
        what = f"{source}: " if source else ""
        super().__init__(f"{what}{n} problem{'s' if n != 1 else ''} in the recipe", problems=problems)


@dataclass
class Interrupted(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    signal_name: str
    checkpoint: str | None = None
    exit_code: int = EXIT_SIGINT
    extra: dict = field(default_factory=dict)


class Stopped(KeyboardInterrupt):
    """Training stopped at once by a second signal (no checkpoint); its exit code follows that signal."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = signal_exit_code(signal_name)
