"""Training: resumable checkpoints, the contrastive (CLIP) objective, and the embedded diffusion model."""
