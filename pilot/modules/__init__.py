"""Building blocks that learners compose, each owning its state: prompts and adapters that attach
to timm's stock ViT, heads, class Gaussians, ridge regression, and weight-merging operators."""
