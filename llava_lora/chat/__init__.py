"""Turning a record into what the model reads: chat templates, prompts, token ids and labels, batches."""
