"""Checkpoints and adapters read and written without holding a model: the adapter's tensors (adapter),
a checkpoint's tensors and layout from its headers (layout), and safetensors streamed tensor by tensor (streaming).
lorakit.merge and lorakit.adapters are built on these. Nothing here imports torch at package import time."""
