"""Training (imports the library, never the other way round): resumable checkpoints, the contrastive objective
and head trainer, `train clip`, the embedded lite-clip build and the embedded denoiser."""
