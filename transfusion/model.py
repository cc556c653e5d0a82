"""The Transfusion transformer: one decoder over text tokens and continuous image patches (Zhou et al. 2024).

- Text tokens are embedded; an image is patchified (a linear layer, or a small conv stem then a strided conv) and
  wrapped in BOI ... EOI tokens.
- Attention is causal over the sequence and bidirectional inside each image (`attention_mask`).
- Patches carry a 2D position embedding and the diffusion timestep's embedding; text tokens carry a 1D position
  that counts text tokens only, so a layout's text positions do not depend on the image size.
- Two heads: next-token logits on text, and the clean image (x0) or the flow velocity (v) on patches. The conv
  variant's image head un-patchifies and refines at full resolution with the noisy image as a skip input (the
  paper's U-Net up block in miniature).

Everything here is shapes and math; layouts, losses and samplers live in `training.py` and `sampling.py`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

MODEL_TYPE = "prunefusion-transfusion"
KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (k, v): [B, heads, S, head_dim]


@dataclass(frozen=True)
class TransfusionConfig:
    vocab_size: int
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    boi_id: int = 3
    eoi_id: int = 4
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    max_text_positions: int = 64
    image_size: int = 32
    channels: int = 3
    patch_size: int = 4
    patchify: str = "conv"  # "linear" | "conv"
    conv_channels: int = 32
    prediction: str = "x0"  # what the image head predicts: "x0" (clean image) or "v" (flow velocity eps - x0)
    model_type: str = MODEL_TYPE

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.patchify not in ("linear", "conv"):
            raise ValueError(f"patchify must be 'linear' or 'conv', not {self.patchify!r}")
        if self.prediction not in ("x0", "v"):
            raise ValueError(f"prediction must be 'x0' or 'v', not {self.prediction!r}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def save(self, directory: Path) -> None:
        (Path(directory) / "config.json").write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> TransfusionConfig:
        data = json.loads((Path(directory) / "config.json").read_text())
        if data.get("model_type") != MODEL_TYPE:
            raise ValueError(f"{directory} is not a Transfusion checkpoint (model_type={data.get('model_type')!r})")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def timestep_embedding(sigmas: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the noise level (sigma in [0, 1], scaled to diffusers' 0..1000 timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=sigmas.device, dtype=torch.float32) / half)
    angles = (sigmas.float() * 1000.0)[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, past: tuple[torch.Tensor, torch.Tensor] | None):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.out(y.transpose(1, 2).reshape(b, s, d)), (k, v)


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x, mask, past):
        h, present = self.attn(self.norm1(x), mask, past)
        x = x + h
        return x + self.mlp(self.norm2(x)), present


class Transfusion(nn.Module):
    def __init__(self, config: TransfusionConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.d_model)
        self.text_position = nn.Embedding(c.max_text_positions, c.d_model)
        # a layout-independent 2D position per patch, initialised large so that position is easy to read off
        self.patch_position = nn.Parameter(torch.randn(c.num_patches, c.d_model))
        self.time_mlp = nn.Sequential(nn.Linear(c.d_model, c.d_model), nn.SiLU(), nn.Linear(c.d_model, c.d_model))
        p, ch, cc = c.patch_size, c.channels, c.conv_channels
        if c.patchify == "linear":
            self.patch_in = nn.Conv2d(ch, c.d_model, p, stride=p)  # == a linear layer on each flattened patch
            self.patch_out = nn.Linear(c.d_model, ch * p * p)
        else:
            self.patch_in = nn.Sequential(nn.Conv2d(ch, cc, 3, padding=1), nn.GELU(),
                                          nn.Conv2d(cc, c.d_model, p, stride=p))
            self.patch_out = nn.Linear(c.d_model, cc * p * p)
            self.refine = nn.Sequential(nn.Conv2d(cc + ch, cc, 3, padding=1), nn.GELU(),
                                        nn.Conv2d(cc, ch, 3, padding=1))
        self.blocks = nn.ModuleList(Block(c.d_model, c.n_heads, c.mlp_ratio) for _ in range(c.n_layers))
        self.norm = nn.LayerNorm(c.d_model)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)

    # ---- inputs -------------------------------------------------------------------------------------------------
    def embed_text(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.text_position(positions.clamp(0, self.config.max_text_positions - 1))

    def embed_patches(self, images: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] noisy images in [-1, 1] at noise level sigmas [B] -> [B, P, d] patch vectors."""
        x = self.patch_in(images).flatten(2).transpose(1, 2)
        t = self.time_mlp(timestep_embedding(sigmas, self.config.d_model).to(x.dtype))
        return x + self.patch_position[None].to(x.dtype) + t[:, None]

    # ---- trunk --------------------------------------------------------------------------------------------------
    def transformer(self, x: torch.Tensor, mask: torch.Tensor, past: KVCache | None = None):
        """x [B, S, d]; mask [B, S, S_past + S] (True = may attend) -> (normed hidden [B, S, d], cache incl. x)."""
        present: KVCache = []
        for i, block in enumerate(self.blocks):
            x, kv = block(x, mask, None if past is None else past[i])
            present.append(kv)
        return self.norm(x), present

    # ---- heads --------------------------------------------------------------------------------------------------
    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def image_prediction(self, patch_hidden: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """Patch hidden states [B, P, d] (+ the noisy input image) -> the x0 or v prediction [B, C, H, W]."""
        c = self.config
        out = self.patch_out(patch_hidden)  # [B, P, ch' * p * p]
        b = out.shape[0]
        per = out.shape[-1] // (c.patch_size**2)
        img = out.view(b, c.grid, c.grid, per, c.patch_size, c.patch_size).permute(0, 3, 1, 4, 2, 5)
        img = img.reshape(b, per, c.image_size, c.image_size)
        if c.patchify == "conv":
            img = self.refine(torch.cat([img, noisy], dim=1))
        return img


def attention_mask(valid: torch.Tensor, image_id: torch.Tensor) -> torch.Tensor:
    """The Transfusion mask for full sequences: [B, S] valid flags and image ids (0 = text) -> [B, S, S] bool.

    Position i may attend to j when j <= i (causal), or when both are patches of the same image (bidirectional
    inside an image), and j is not padding. Every row may attend to itself, so padded rows stay finite."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    same_image = (image_id[:, :, None] == image_id[:, None, :]) & (image_id[:, :, None] > 0)
    eye = torch.eye(s, dtype=torch.bool, device=valid.device)
    return ((causal[None] | same_image) & valid[:, None, :]) | eye[None]


def images_to_tensor(images, device=None) -> torch.Tensor:
    """uint8 [B, H, W, C] (numpy or torch) -> float [B, C, H, W] in [-1, 1]."""
    t = torch.as_tensor(images, device=device)
    return t.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor):
    """float [B, C, H, W] in [-1, 1] -> uint8 numpy [B, H, W, C]."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
