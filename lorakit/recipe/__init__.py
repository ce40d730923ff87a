"""The recipe: YAML with positions -> a validated `Recipe` (schema, cross-field rules, `extends`, `--set`)."""
