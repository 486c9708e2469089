"""Inference: the engine (batched and streamed generation), answers, generate, eval and its metrics, the demo."""
