"""Shared test helpers: paired pipelines (diffusers+PEFT vs lorakit), synthetic LoRA files, fixed model inputs."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import lorakit
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict
from lorakit.testing.models import tiny_flux_pipeline, tiny_sd15_pipeline, tiny_sdxl_pipeline

FAMILIES = {
    "sd15": (tiny_sd15_pipeline, "unet", ("text_encoder",)),
    "sdxl": (tiny_sdxl_pipeline, "unet", ("text_encoder", "text_encoder_2")),
    "flux": (tiny_flux_pipeline, "transformer", ("text_encoder",)),
}
DENOISER_TARGETS = TRANSFORMER_TARGETS + ("proj_mlp", "norm1.linear", "linear_1", "linear_2")


@dataclass
class Family:
    name: str
    denoiser: str
    text_encoders: tuple[str, ...]

    def build(self, dtype=torch.float32):
        return FAMILIES[self.name][0](dtype=dtype)

    @property
    def call_kwarg(self) -> str:
        return "joint_attention_kwargs" if self.name == "flux" else "cross_attention_kwargs"


def family(name: str) -> Family:
    _, den, tes = FAMILIES[name]
    return Family(name, den, tes)


def lora_state_dict(pipe, fam: Family, seed: int, fmt: str = "peft", rank: int = 4, convs: bool = False,
                    text_encoders: bool = True, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A pipeline-level LoRA file (denoiser + text encoders) as a state dict."""
    den = getattr(pipe, fam.denoiser)
    sd = to_state_dict(make_lora(den, rank=rank, seed=seed, targets=DENOISER_TARGETS, convs=convs, alpha=alpha),
                       fmt, fam.denoiser, model=den)
    if text_encoders:
        for i, te in enumerate(fam.text_encoders):
            model = getattr(pipe, te)
            layers = make_lora(model, rank=rank, seed=seed + 100 + i, targets=TRANSFORMER_TARGETS, alpha=alpha)
            sd.update(to_state_dict(layers, fmt, te, model=model, sdxl_te=len(fam.text_encoders) > 1))
    return sd


def write(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> str:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return str(path)


def denoiser_inputs(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    cfg = model.config
    if hasattr(model, "down_blocks"):
        out = dict(sample=torch.randn(1, cfg.in_channels, 8, 8, generator=g),
                   timestep=torch.tensor([10]),
                   encoder_hidden_states=torch.randn(1, 7, cfg.cross_attention_dim, generator=g))
        if cfg.addition_embed_type == "text_time":
            text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": torch.randn(1, text_dim, generator=g),
                                        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    else:
        seq, txt = 16, 5
        out = dict(hidden_states=torch.randn(1, seq, cfg.in_channels, generator=g),
                   encoder_hidden_states=torch.randn(1, txt, cfg.joint_attention_dim, generator=g),
                   pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g),
                   timestep=torch.tensor([0.5]), img_ids=torch.zeros(seq, 3), txt_ids=torch.zeros(txt, 3))
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in out.items()}


@torch.no_grad()
def outputs(pipe, fam: Family, **call_kwargs) -> dict[str, torch.Tensor]:
    """Denoiser and text-encoder outputs on fixed inputs."""
    den = getattr(pipe, fam.denoiser)
    res = {"denoiser": den(**denoiser_inputs(den), **call_kwargs, return_dict=False)[0]}
    ids = torch.tensor([[0, 5, 9, 14, 2, 1] + [1] * 4])
    for te in fam.text_encoders:
        res[te] = getattr(pipe, te)(ids)[0]
    return res


def assert_close(a: dict, b: dict, atol: float = 1e-5, what: str = "") -> None:
    for k in a:
        diff = (a[k].float() - b[k].float()).abs().max().item()
        assert diff <= atol, f"{what} {k}: max |diff| {diff:.3e} > {atol}"


def assert_differs(a: dict, b: dict, key: str, min_diff: float = 1e-3) -> None:
    diff = (a[key].float() - b[key].float()).abs().max().item()
    assert diff > min_diff, f"{key}: LoRA had no visible effect (max |diff| {diff:.2e})"


@torch.no_grad()
def run_pipeline(pipe, fam: Family, **kwargs) -> torch.Tensor:
    size = dict(height=32, width=32, max_sequence_length=16) if fam.name == "flux" else dict(height=64, width=64)
    return pipe("a photo of a cat", num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(0), **size, **kwargs).images


def pair(fam: Family, dtype=torch.float32, mode: str = "auto"):
    """(diffusers+PEFT pipeline, lorakit pipeline) with identical weights."""
    ref = fam.build(dtype)
    ours = fam.build(dtype)
    lorakit.attach(ours, mode=mode)
    return ref, ours


def params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_params_equal(before: dict, module) -> None:
    after = module.state_dict()
    assert set(after) == set(before), f"state_dict keys changed: {set(after) ^ set(before)}"
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def snapshot(pipe, names) -> dict:
    return {n: params(getattr(pipe, n)) for n in names}


def deep(sd):
    return copy.deepcopy(sd)
