"""Adapters beyond one merge: compose several into one, unmerge a merged checkpoint, extract one from a
fine-tuned model. Each command is one module (compose, unmerge, extract); they read adapters and stream
checkpoints with lorakit.checkpoints. Nothing here imports torch at package import time."""
