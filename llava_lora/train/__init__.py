"""LoRA training: the config, the loop, checkpoints, runtime options, held-out evaluation, logs."""
