"""The composed model: build, key layout on disk, dtypes and precision, the loaders, LoRA adapters, the loss."""
