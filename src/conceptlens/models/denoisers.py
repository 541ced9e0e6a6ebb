"""Text-conditioned denoisers (the `Denoiser` protocol): the embedded one and any diffusers pipeline.

`TinyDiffusion` is the embedded denoiser: diffusers' UNet2DConditionModel + DDPMScheduler on 32x32 images.

The 32x32x3 image is pixel-unshuffled to 16x16x12 (a lossless reshape, our stand-in for a VAE's latent
space) so the UNet runs at a quarter of the spatial cost; text enters as the MiniLM sentence embedding
through the UNet's projection class embedding (added to the time embedding), which is what
cross-attention over a single pooled token reduces to, at a fraction of its CPU cost.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ..errors import ConceptlensError
from ..io import asset_path, file_sha256, read_safetensors_meta, save_safetensors
from ..runtime import resolve_device
from .text import minilm

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


def add_noise(z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The forward process q(z_t | z_0) = sqrt(ᾱ_t) z_0 + sqrt(1 − ᾱ_t) ε (training and scoring share it)."""
    a = alphas_cumprod[t].view(-1, *([1] * (z0.ndim - 1)))
    return a.sqrt() * z0 + (1 - a).sqrt() * noise


@dataclass
class TinyDiffusion:
    """Pipeline-like bundle: unet + scheduler + text encoder; `denoise` is the classifier's one entry point."""

    unet: torch.nn.Module
    scheduler: object
    name: str = NAME
    meta: dict | None = None
    image_size: int = 32
    device: torch.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "TinyDiffusion":
        self.device = resolve_device(device)
        self.unet.to(self.device)
        return self

    @classmethod
    def from_config(cls, seed: int = 0) -> "TinyDiffusion":
        from diffusers import DDPMScheduler, UNet2DConditionModel  # heavy: imported where used
        torch.manual_seed(seed)
        return cls(UNet2DConditionModel(**UNET_CONFIG), DDPMScheduler(**SCHEDULER_CONFIG), name=f"{NAME}/random")

    @staticmethod
    def encode_prompts(prompts: list[str]) -> torch.Tensor:
        """MiniLM sentence embeddings [N, 384] (the conditioning the model was trained with)."""
        return minilm().encode_text(prompts)

    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        """[B,3,32,32] in [-1,1] -> the space noise is added in."""
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ConceptlensError(f"{self.name} takes {self.image_size}x{self.image_size} images, "
                                   f"got {tuple(images.shape[-2:])}")
        return pack(images.to(self.device))

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Predicted noise for latents z_t at timesteps t given conditioning vectors [B, 384]."""
        return self.unet(z_t, t, cond[:, None, :], class_labels=cond).sample


def default_path() -> Path:
    return asset_path(ASSET)


@lru_cache(maxsize=2)
def load_tiny_diffusion(path: str | None = None) -> TinyDiffusion:
    """The shipped denoiser (EMA weights, fp16 on disk, fp32 in memory) with its provenance metadata."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    p = Path(path) if path else default_path()
    if not p.exists():
        raise ConceptlensError(f"{NAME} weights not found at {p}; train them with "
                               "`conceptlens train diffusion --data ../shared/data/cifar10/train-*.tar.gz`")
    meta = read_safetensors_meta(p) | {"sha": file_sha256(p)[:16]}
    unet = UNet2DConditionModel(**meta.get("unet_config", UNET_CONFIG))
    unet.load_state_dict({k: v.float() for k, v in load_file(str(p)).items()})
    return TinyDiffusion(unet.eval(), DDPMScheduler(**meta.get("scheduler_config", SCHEDULER_CONFIG)), meta=meta)


def export_weights(model: TinyDiffusion, path: Path, meta: dict) -> Path:
    """Ship weights in fp16 safetensors (half the size; the classifier runs them in fp32/bf16)."""
    tensors = {k: v.detach().half() for k, v in model.unet.state_dict().items()}
    return save_safetensors(path, tensors, dict(meta, unet_config=UNET_CONFIG, scheduler_config=SCHEDULER_CONFIG))


class DiffusersModel:
    """Any diffusers text-to-image pipeline (UNet2DConditionModel + scheduler + CLIP text encoder + optional VAE)."""

    def __init__(self, pipe, name: str = "diffusers"):
        unet = getattr(pipe, "unet", None)
        if unet is None or getattr(unet.config, "cross_attention_dim", None) is None:
            raise ConceptlensError(f"{name}: not a text-conditioned diffusion model (no UNet with cross-attention)")
        if getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise ConceptlensError(f"{name}: the pipeline has no text encoder/tokenizer: no text conditioning")
        self.pipe, self.unet, self.scheduler, self.name = pipe, unet.eval(), pipe.scheduler, name
        self.vae = getattr(pipe, "vae", None)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.image_size = unet.config.sample_size * factor
        self.device = torch.device("cpu")

    def to(self, device: str | torch.device) -> "DiffusersModel":
        self.device = resolve_device(device)
        self.pipe.to(self.device)
        return self

    @classmethod
    def from_pretrained(cls, repo: str) -> "DiffusersModel":
        from diffusers import DiffusionPipeline
        try:
            pipe = DiffusionPipeline.from_pretrained(repo, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - diffusers raises many types for "not here"
            raise ConceptlensError(f"diffusers:{repo} is not available offline ({type(exc).__name__}); nothing is "
                                   "downloaded at run time: give a local pipeline folder") from None
        return cls(pipe, f"diffusers:{repo}")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(prompts, padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    @torch.no_grad()
    def to_model_space(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ConceptlensError(f"{self.name} takes {self.image_size}x{self.image_size} images, "
                                   f"got {tuple(images.shape[-2:])}")
        images = images.to(self.device)
        if self.vae is None:
            return images
        return self.vae.encode(images).latent_dist.mean * self.vae.config.scaling_factor

    def denoise(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.unet(z_t, t, encoder_hidden_states=cond).sample
