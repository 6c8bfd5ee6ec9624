"""Checkpoint input and output: reading Hugging Face folders (safetensors, torch ``.bin``),
float16/bfloat16 storage, the hub, tokenizers, and minisq's own saved-model format."""
