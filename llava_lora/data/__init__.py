"""LLaVA-format data: reading records, checking them, images, synthetic sets."""
