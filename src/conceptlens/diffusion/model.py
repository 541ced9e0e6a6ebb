"""The embedded text-conditioned denoiser: diffusers' UNet2DConditionModel + DDPMScheduler on 32x32 images.

The 32x32x3 image is pixel-unshuffled to 16x16x12 (a lossless reshape, our stand-in for a VAE's latent
space) so the UNet runs at a quarter of the spatial cost; text enters as the MiniLM sentence embedding
through the UNet's projection class embedding (added to the time embedding), which is what
cross-attention over a single pooled token reduces to, at a fraction of its CPU cost.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import ConceptlensError

NAME = "builtin:tiny-diffusion-cifar10"
ASSET = "tiny_diffusion_cifar10.safetensors"
TEXT_DIM = 384

UNET_CONFIG = dict(
    sample_size=16, in_channels=12, out_channels=12, block_out_channels=(128, 128, 256), layers_per_block=1,
    down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3, norm_num_groups=32,
    cross_attention_dim=TEXT_DIM, class_embed_type="projection", projection_class_embeddings_input_dim=TEXT_DIM,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon",
                        clip_sample=True)

# CIFAR-10 captions: training templates/synonyms, and templates held out of training for evaluation.
SYNONYMS = {
    "airplane": ["airplane", "aeroplane", "plane", "jet", "airliner", "aircraft"],
    "automobile": ["automobile", "car", "sedan", "passenger car", "motorcar"],
    "bird": ["bird", "small bird", "songbird", "wild bird"],
    "cat": ["cat", "kitten", "house cat", "kitty"],
    "deer": ["deer", "fawn", "stag", "doe"],
    "dog": ["dog", "puppy", "hound", "pet dog"],
    "frog": ["frog", "toad", "tree frog"],
    "horse": ["horse", "pony", "stallion", "mare"],
    "ship": ["ship", "boat", "vessel", "cargo ship"],
    "truck": ["truck", "lorry", "pickup truck", "dump truck", "fire truck"],
}
TRAIN_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a picture of a {}.", "an image of the {}.",
    "a low resolution photo of a {}.", "a close-up photo of a {}.", "{}", "a small {}.",
    "a pixelated photo of the {}.", "a cropped photo of a {}.", "a photo of the {}.", "a bright photo of a {}.",
    "a dark photo of the {}.", "a snapshot of a {}.", "there is a {} in the picture.", "a tiny photo of a {}.",
]
EVAL_TEMPLATES = ["a good photo of a {}.", "itap of a {}.", "a photo of my {}.", "a nice picture of the {}."]


def pack(x: torch.Tensor) -> torch.Tensor:
    """[B,3,32,32] in [-1,1] -> [B,12,16,16] (space-to-depth)."""
    return F.pixel_unshuffle(x, 2)


def unpack(z: torch.Tensor) -> torch.Tensor:
    return F.pixel_shuffle(z, 2)


@dataclass
class TinyDiffusion:
    """Pipeline-like bundle: unet + scheduler + text encoder; `denoise` is the classifier's one entry point."""

    unet: torch.nn.Module
    scheduler: object
    name: str = NAME
    meta: dict | None = None
    image_size: int = 32

    @classmethod
    def from_config(cls, seed: int = 0) -> "TinyDiffusion":
        from diffusers import DDPMScheduler, UNet2DConditionModel
        torch.manual_seed(seed)
        return cls(UNet2DConditionModel(**UNET_CONFIG), DDPMScheduler(**SCHEDULER_CONFIG), name=f"{NAME}/random")

    @staticmethod
    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        """MiniLM sentence embeddings [N, 384] (the conditioning the model was trained with)."""
        from ..models.builtin import minilm
        return minilm().encode_text(prompts)

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,32,32] in [-1,1] -> the space noise is added in."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ConceptlensError(f"{self.name} takes {self.image_size}x{self.image_size} images, "
                                   f"got {tuple(images.shape[-2:])}")
        return pack(images)

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise for latents z_t at timesteps t given conditioning vectors [B, 384]."""
        return self.unet(z_t, t, cond[:, None, :], class_labels=cond).sample


def _asset_path() -> Path:
    return Path(str(resources.files("conceptlens") / "assets" / ASSET))


@lru_cache(maxsize=2)
def load_tiny_diffusion(path: str | None = None) -> TinyDiffusion:
    """The shipped denoiser (EMA weights, fp16 on disk, fp32 in memory) with its provenance metadata."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import load_file

    from ..train.checkpoint import read_meta
    p = Path(path) if path else _asset_path()
    if not p.exists():
        raise ConceptlensError(f"{NAME} weights not found at {p}; train them with "
                               "`conceptlens train diffusion --data ../shared/data/cifar10/train-*.tar.gz`")
    from ..utils import file_sha256
    meta = read_meta(p) | {"sha": file_sha256(p)[:16]}
    unet = UNet2DConditionModel(**meta.get("unet_config", UNET_CONFIG))
    unet.load_state_dict({k: v.float() for k, v in load_file(str(p)).items()})
    return TinyDiffusion(unet.eval(), DDPMScheduler(**meta.get("scheduler_config", SCHEDULER_CONFIG)), meta=meta)


def export_weights(model: TinyDiffusion, path: Path, meta: dict) -> None:
    """Ship weights in fp16 safetensors (half the size; the classifier runs them in fp32/bf16)."""
    from safetensors.torch import save_file

    from ..train.checkpoint import META_KEY
    tensors = {k: v.detach().half().contiguous() for k, v in model.unet.state_dict().items()}
    full = dict(meta, unet_config=UNET_CONFIG, scheduler_config=SCHEDULER_CONFIG)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(full)})
