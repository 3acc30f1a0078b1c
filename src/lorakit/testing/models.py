"""Diffusers pipelines and models built from config with seeded random weights.

Nothing is downloaded: every model comes from a config written here and the
tokenizers are generated in memory. Weights are filled by :func:`randomize_`,
which seeds one generator per parameter from ``seed`` and the parameter's name,
so the same seed always gives bit-identical weights on a given device type
(CPU and CUDA generators produce different streams).

The ``tiny_*`` builders make pipelines that run end to end on a CPU in well
under a second. The full-size builders (``sd15_*``, ``sdxl_*``,
``flux_transformer``) have the real architectures' shapes, for benchmarks: they
skip the libraries' slow default initialisation, allocate directly on the
requested device in the requested dtype, and accept ``device="meta"`` for a
shape-only model without storage.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from torch import nn
from .tokenizers import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, TINY_VOCAB_SIZE, clip_tokenizer, t5_tokenizer
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedModel,
    T5Config,
    T5EncoderModel,
)

__all__ = [
    "CLIP_VOCAB_SIZE",
    "TINY_VOCAB_SIZE",
    "clip_tokenizer",
    "flux_transformer",
    "randomize_",
    "sd15_pipeline",
    "sd15_text_encoder",
    "sd15_unet",
    "sdxl_text_encoders",
    "sdxl_unet",
    "t5_tokenizer",
    "tiny_flux_pipeline",
    "tiny_sd15_pipeline",
    "tiny_sdxl_pipeline",
]

DeviceLike = str | torch.device
ModuleT = TypeVar("ModuleT", bound=nn.Module)


# torch.nn.init functions that modules call from their constructors.
_TORCH_INIT_FUNCTIONS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "eye_",
    "dirac_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "sparse_",
)


# --------------------------------------------------------------------------- #
# Construction and seeded initialisation
# --------------------------------------------------------------------------- #


def _return_tensor(tensor: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """No-op stand-in for a ``torch.nn.init`` function."""
    return tensor


@contextlib.contextmanager
def _skip_default_init() -> Iterator[None]:
    """Turn torch's and transformers' weight initialisation into no-ops.

    ``PreTrainedModel.initialize_weights`` is patched rather than
    ``init_weights`` so that weight tying (e.g. T5's shared embedding) still
    happens. The patch is process-global while the context is active.
    """
    saved_init = {name: getattr(nn.init, name) for name in _TORCH_INIT_FUNCTIONS}
    saved_initialize = PreTrainedModel.initialize_weights
    try:
        for name in _TORCH_INIT_FUNCTIONS:
            setattr(nn.init, name, _return_tensor)
        PreTrainedModel.initialize_weights = lambda self: None  # type: ignore[method-assign]
        yield
    finally:
        for name, fn in saved_init.items():
            setattr(nn.init, name, fn)
        PreTrainedModel.initialize_weights = saved_initialize  # type: ignore[method-assign]


@contextlib.contextmanager
def _building(device: DeviceLike, dtype: torch.dtype) -> Iterator[None]:
    """Create modules on ``device`` in ``dtype`` without initialising their weights.

    Sets torch's default dtype while active, which is process-global.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating point type, got {dtype}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), _skip_default_init():
            yield
    finally:
        torch.set_default_dtype(previous)


def _derive_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from ``seed`` and ``key`` (a component or parameter name)."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def _uniform_(param: torch.Tensor, bound: float, seed: int) -> None:
    """Fill ``param`` with ``U(-bound, bound)`` from its own seeded generator."""
    generator = torch.Generator(device=param.device).manual_seed(seed)
    param.uniform_(-bound, bound, generator=generator)


@torch.no_grad()
def randomize_(model: ModuleT, seed: int = 0) -> ModuleT:
    """Fill every parameter of ``model`` in place with seeded random values; return it.

    Matrices and kernels get ``U(-b, b)`` with the variance of
    ``N(0, 1/fan_in)`` (embeddings: std 0.02); 1-D ``weight`` parameters (norm
    scales) are set to one and other vectors (biases) to zero. Each parameter
    has its own generator seeded from ``seed`` and its name, so values do not
    depend on fill order, and CPU tensors are filled by a thread pool. Uniform
    is used because it is several times faster than ``normal_`` on CPU. Meta
    tensors are skipped.
    """
    modules = dict(model.named_modules())
    jobs: list[tuple[torch.Tensor, float, int]] = []
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        owner, _, leaf = name.rpartition(".")
        if param.ndim >= 2:
            if isinstance(modules[owner], nn.Embedding):
                std = 0.02
            else:
                std = 1.0 / math.sqrt(math.prod(param.shape[1:]))
            jobs.append((param, std * math.sqrt(3.0), _derive_seed(seed, name)))
        elif leaf == "weight":
            param.fill_(1.0)
        else:
            param.zero_()

    cpu_jobs = sorted((job for job in jobs if job[0].device.type == "cpu"), key=lambda job: -job[0].numel())
    for job in jobs:
        if job[0].device.type != "cpu":
            _uniform_(*job)
    workers = min(torch.get_num_threads(), len(cpu_jobs))
    if workers > 1:
        # CPU uniform_ runs on one thread and releases the GIL.
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda job: _uniform_(*job), cpu_jobs):
                pass
    else:
        for job in cpu_jobs:
            _uniform_(*job)
    return model


def _build(
    factory: Callable[[], ModuleT], *, seed: int, dtype: torch.dtype, device: DeviceLike
) -> ModuleT:
    """Create a model with ``factory`` on ``device`` in ``dtype``, randomise it, set eval mode."""
    with _building(device, dtype):
        model = factory()
    randomize_(model, seed)
    if any(t.is_floating_point() and t.dtype != dtype for t in model.state_dict().values()):
        model = model.to(dtype=dtype)
    return model.eval()


# --------------------------------------------------------------------------- #
# Configs
# --------------------------------------------------------------------------- #


def _clip_config(
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    vocab_size: int,
    hidden_act: str,
) -> CLIPTextConfig:
    """A ``CLIPTextConfig`` whose special-token ids match :func:`clip_tokenizer`."""
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        projection_dim=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def _tiny_clip_config() -> CLIPTextConfig:
    return _clip_config(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=37,
        vocab_size=TINY_VOCAB_SIZE,
        hidden_act="gelu",
    )


def _clip_l_config() -> CLIPTextConfig:
    """CLIP ViT-L/14 text tower (SD1.5, and SDXL's first encoder)."""
    return _clip_config(
        hidden_size=768,
        num_layers=12,
        num_heads=12,
        intermediate_size=3072,
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_act="quick_gelu",
    )


def _clip_g_config() -> CLIPTextConfig:
    """OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder)."""
    return _clip_config(
        hidden_size=1280,
        num_layers=32,
        num_heads=20,
        intermediate_size=5120,
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_act="gelu",
    )


def _tiny_t5_config() -> T5Config:
    return T5Config(
        vocab_size=TINY_VOCAB_SIZE,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )


def _vae(block_out_channels: tuple[int, ...], **config: object) -> AutoencoderKL:
    """A small ``AutoencoderKL`` that downsamples ``2 ** (levels - 1)`` times."""
    levels = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        norm_num_groups=min(32, *block_out_channels),
        **config,  # type: ignore[arg-type]
    )


def _sd_scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# --------------------------------------------------------------------------- #
# Tiny pipelines
# --------------------------------------------------------------------------- #


def tiny_sd15_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> StableDiffusionPipeline:
    """A tiny SD1.5-shaped ``StableDiffusionPipeline`` (default image size 64x64).

    The UNet has a cross-attention down block, a plain down block, a
    cross-attention mid block, a plain up block and a cross-attention up block.
    """
    unet = _build(
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        ),
        seed=_derive_seed(seed, "unet"),
        dtype=dtype,
        device=device,
    )
    text_encoder = _build(
        lambda: CLIPTextModel(_tiny_clip_config()),
        seed=_derive_seed(seed, "text_encoder"),
        dtype=dtype,
        device=device,
    )
    vae = _build(
        lambda: _vae((32, 64), sample_size=64),
        seed=_derive_seed(seed, "vae"),
        dtype=dtype,
        device=device,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(TINY_VOCAB_SIZE),
        unet=unet,
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> StableDiffusionXLPipeline:
    """A tiny SDXL-shaped ``StableDiffusionXLPipeline`` (default image size 64x64).

    Two 32-wide text encoders feed a 64-dim cross-attention, and the UNet uses
    SDXL's ``text_time`` added conditioning.
    """
    text_encoder = _build(
        lambda: CLIPTextModel(_tiny_clip_config()),
        seed=_derive_seed(seed, "text_encoder"),
        dtype=dtype,
        device=device,
    )
    text_encoder_2 = _build(
        lambda: CLIPTextModelWithProjection(_tiny_clip_config()),
        seed=_derive_seed(seed, "text_encoder_2"),
        dtype=dtype,
        device=device,
    )
    time_embed_dim = 8
    unet = _build(
        lambda: UNet2DConditionModel(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + text_encoder_2.config.projection_dim,
        ),
        seed=_derive_seed(seed, "unet"),
        dtype=dtype,
        device=device,
    )
    vae = _build(
        lambda: _vae((32, 64), sample_size=64, scaling_factor=0.13025),
        seed=_derive_seed(seed, "vae"),
        dtype=dtype,
        device=device,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(TINY_VOCAB_SIZE),
        tokenizer_2=clip_tokenizer(TINY_VOCAB_SIZE),
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> FluxPipeline:
    """A tiny FLUX.1-shaped ``FluxPipeline``; image sides must be multiples of 4.

    The VAE downsamples 2x to 4 latent channels, which Flux packs into 2x2
    patches, so the transformer sees 16 input channels.
    """
    latent_channels = 4
    text_encoder = _build(
        lambda: CLIPTextModel(_tiny_clip_config()),
        seed=_derive_seed(seed, "text_encoder"),
        dtype=dtype,
        device=device,
    )
    text_encoder_2 = _build(
        lambda: T5EncoderModel(_tiny_t5_config()),
        seed=_derive_seed(seed, "text_encoder_2"),
        dtype=dtype,
        device=device,
    )
    transformer = _build(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=latent_channels * 4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=text_encoder_2.config.d_model,
            pooled_projection_dim=text_encoder.config.hidden_size,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ),
        seed=_derive_seed(seed, "transformer"),
        dtype=dtype,
        device=device,
    )
    vae = _build(
        lambda: _vae(
            (32, 64),
            latent_channels=latent_channels,
            sample_size=32,
            scaling_factor=1.5035,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        ),
        seed=_derive_seed(seed, "vae"),
        dtype=dtype,
        device=device,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(TINY_VOCAB_SIZE),
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer(TINY_VOCAB_SIZE),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- #
# Full-size models
# --------------------------------------------------------------------------- #


def sd15_unet(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> UNet2DConditionModel:
    """A random ``UNet2DConditionModel`` with the Stable Diffusion 1.5 shape (~860M params)."""
    return _build(
        lambda: UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=(
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        seed=_derive_seed(seed, "unet"),
        dtype=dtype,
        device=device,
    )


def sd15_text_encoder(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> CLIPTextModel:
    """A random CLIP ViT-L/14-shaped ``CLIPTextModel`` (SD1.5's text encoder, ~123M params)."""
    return _build(
        lambda: CLIPTextModel(_clip_l_config()),
        seed=_derive_seed(seed, "text_encoder"),
        dtype=dtype,
        device=device,
    )


def sd15_pipeline(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> StableDiffusionPipeline:
    """A ``StableDiffusionPipeline`` with full-size SD1.5 UNet and text encoder.

    The VAE is tiny but downsamples 8x like the real one, so 512x512 images use
    64x64 latents. The UNet and text encoder equal :func:`sd15_unet` and
    :func:`sd15_text_encoder` for the same seed.
    """
    vae = _build(
        lambda: _vae((32, 32, 64, 64), sample_size=512),
        seed=_derive_seed(seed, "vae"),
        dtype=dtype,
        device=device,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=sd15_text_encoder(seed=seed, dtype=dtype, device=device),
        tokenizer=clip_tokenizer(CLIP_VOCAB_SIZE),
        unet=sd15_unet(seed=seed, dtype=dtype, device=device),
        scheduler=_sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_unet(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> UNet2DConditionModel:
    """A random ``UNet2DConditionModel`` with the SDXL base 1.0 shape (~2.6B params)."""
    return _build(
        lambda: UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        seed=_derive_seed(seed, "unet"),
        dtype=dtype,
        device=device,
    )


def sdxl_text_encoders(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    """Random SDXL text encoders: CLIP ViT-L (~123M params) and ViT-bigG with projection (~695M)."""
    text_encoder = _build(
        lambda: CLIPTextModel(_clip_l_config()),
        seed=_derive_seed(seed, "text_encoder"),
        dtype=dtype,
        device=device,
    )
    text_encoder_2 = _build(
        lambda: CLIPTextModelWithProjection(_clip_g_config()),
        seed=_derive_seed(seed, "text_encoder_2"),
        dtype=dtype,
        device=device,
    )
    return text_encoder, text_encoder_2


def flux_transformer(
    *, seed: int = 0, dtype: torch.dtype = torch.float32, device: DeviceLike = "cpu"
) -> FluxTransformer2DModel:
    """A random ``FluxTransformer2DModel`` with the FLUX.1-dev shape (~11.9B params)."""
    return _build(
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ),
        seed=_derive_seed(seed, "transformer"),
        dtype=dtype,
        device=device,
    )


# The further families' tiny models live in their own module; importable from here as before.
from .family_models import *  # noqa: E402,F401,F403
from .family_models import __all__ as _family_all  # noqa: E402

__all__ += _family_all
