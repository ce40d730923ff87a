"""`lorakit estimate`: exact parameter counts and a memory forecast from the model's config, never its weights."""
