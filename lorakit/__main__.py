"""`python -m lorakit` (and `accelerate launch -m lorakit`) runs the CLI."""

from lorakit.cli import main

if __name__ == "__main__":
    main()
