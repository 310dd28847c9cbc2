"""Reusable pieces that attach to timm's stock ViT (prompts, adapters) and operate on weights."""
