"""Export: the adapter merged into a plain checkpoint, and GGUF files for llama.cpp / Ollama."""
