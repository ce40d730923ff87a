"""Export a trained model to other runtimes' formats: `lorakit export RUN --format gguf`.

Torch-free on purpose: the CLI checks its arguments against these names before anything heavy loads.
`gguf_writer.export_gguf` writes the file, `gguf_vocab` its tokenizer, `modelfile` the Ollama Modelfile
beside it and `verify` loads it back through transformers' GGUF loader.
"""

FORMATS = ("gguf",)
QUANTS = ("f16", "bf16", "q8_0", "q4_0")
ARCHITECTURES = ("llama", "mistral", "qwen2")  # config.json model_type values export_gguf writes
