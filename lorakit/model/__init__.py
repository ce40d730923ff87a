"""Base models: where the weights come from, their shapes without weights, loading with LoRA attached."""
