"""Synthetic, seeded LyCORIS files (kohya names) for every algorithm lorakit reads, on Linear, Conv and norm layers.

Each target layer gets one layout of the algorithm, cycling through every layout the algorithm has (LoKr: each
full/factored/Tucker combination; DoRA: both ``dora_scale`` layouts and each inner algorithm; ...), so one file
covers them all.

Example:
    >>> sd = make_lycoris(pipe.unet, "loha", seed=1)        # doctest: +SKIP
    >>> sorted(sd)[:2]                                      # doctest: +SKIP
    ['lora_unet_down_blocks_0_attentions_0_..._to_q.alpha', 'lora_unet_..._to_q.hada_w1_a']
"""

from __future__ import annotations

import torch
from torch import nn

from ..families import is_unet, unet_ldm_names

ALGORITHMS = ("loha", "lokr", "dora", "glora", "full", "norm", "ia3", "oft", "boft")
LINEAR_TARGETS = ("to_q", "to_out.0", "ff.net.2", "time_emb_proj")
CONV_TARGETS = ("conv1", "conv_shortcut")
LAYOUTS = {"loha": 2, "lokr": 6, "dora": 4, "glora": 3, "full": 2, "norm": 1, "ia3": 3, "oft": 3, "boft": 1}


def targets(model: nn.Module, algo: str) -> dict[str, nn.Module]:
    """The layers a synthetic file of ``algo`` changes: norm layers for ``norm``, else Linear and Conv2d layers."""
    out = {}
    for path, module in model.named_modules():
        if algo == "norm":
            ok = isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and path.endswith(("norm1", "norm2"))
        else:
            ok = (isinstance(module, nn.Linear) and path.endswith(LINEAR_TARGETS)) or \
                (isinstance(module, nn.Conv2d) and path.endswith(CONV_TARGETS))
        if ok:
            out[path] = module
    return out


def _tensors(algo: str, layout: int, w: torch.Tensor, has_bias: bool, rank: int, g: torch.Generator,
             std: float) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for one layer (without the module key)."""
    def rnd(*shape: int, s: float = std) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    if algo == "norm":
        return {"w_norm": rnd(w.shape[0]), "b_norm": rnd(w.shape[0])}
    out, inp, kernel = w.shape[0], w.shape[1], tuple(w.shape[2:])
    flat = w[0].numel()
    conv = bool(kernel)
    big_kernel = conv and kernel != (1, 1)
    r = rank
    if algo == "loha":
        if layout == 1 and big_kernel:  # Tucker
            return {"hada_w1_a": rnd(r, out), "hada_w1_b": rnd(r, inp), "hada_t1": rnd(r, r, *kernel),
                    "hada_w2_a": rnd(r, out), "hada_w2_b": rnd(r, inp), "hada_t2": rnd(r, r, *kernel),
                    "alpha": torch.tensor(2.0)}
        return {"hada_w1_a": rnd(out, r), "hada_w1_b": rnd(r, flat), "hada_w2_a": rnd(out, r),
                "hada_w2_b": rnd(r, flat), "alpha": torch.tensor(2.0)}
    if algo == "lokr":
        a, c = 4, 2
        b, d = out // a, inp // c
        w1 = {"lokr_w1": rnd(a, c, s=1.0)} if layout in (0, 1, 4) else \
            {"lokr_w1_a": rnd(a, r, s=1.0), "lokr_w1_b": rnd(r, c, s=1.0)}
        if layout in (0, 2):  # full w2 (4-D for convs)
            w2 = {"lokr_w2": rnd(b, d, *kernel)}
        elif layout in (4, 5) and big_kernel:  # Tucker w2
            w2 = {"lokr_w2_a": rnd(r, b), "lokr_w2_b": rnd(r, d), "lokr_t2": rnd(r, r, *kernel)}
        else:
            w2 = {"lokr_w2_a": rnd(b, r), "lokr_w2_b": rnd(r, d * (flat // inp))}
        return {**w1, **w2, "alpha": torch.tensor(3.0)}
    if algo == "dora":
        inner = [("lora", 0), ("lora", 0), ("loha", 0), ("lokr", 3)][layout]
        if inner[0] == "lora":
            t = {"lora_down.weight": rnd(r, inp, *kernel), "lora_up.weight": rnd(out, r, *((1, 1) if conv else ())),
                 "alpha": torch.tensor(2.0)}
        else:
            t = _tensors(inner[0], inner[1], w, has_bias, rank, g, std)
        norm_axis = 0 if layout != 1 else 1  # layout 1: the older [1, in, ...] dora_scale
        dims = [d for d in range(w.dim()) if d != norm_axis]
        noise = rnd(*[w.shape[i] if i == norm_axis else 1 for i in range(w.dim())], s=0.1)
        scale = torch.linalg.vector_norm(w.float(), dim=dims, keepdim=True) * (1 + noise)
        return {**t, "dora_scale": scale}
    if algo == "glora":
        if layout == 2 and not conv:  # the old layout (older LyCORIS; ComfyUI's "old GLoRA")
            return {"a1.weight": rnd(r, inp), "a2.weight": rnd(inp, r), "b1.weight": rnd(r, inp),
                    "b2.weight": rnd(out, r), "alpha": torch.tensor(2.0)}
        t = {"a1.weight": rnd(inp, r, *((1, 1) if conv else ())), "a2.weight": rnd(r, inp, *((1, 1) if conv else ())),
             "b1.weight": rnd(out, r, *((1, 1) if conv else ())), "alpha": torch.tensor(2.0)}
        if layout == 1 and big_kernel:
            return {**t, "b2.weight": rnd(r, inp, 1, 1), "bm.weight": rnd(r, r, *kernel)}
        return {**t, "b2.weight": rnd(r, inp, *kernel)}
    if algo == "full":
        t = {"diff": rnd(*w.shape, s=std * 0.1)} if layout == 0 or not has_bias else {}
        return {**t, "diff_b": rnd(out, s=std * 0.1)} if has_bias else t
    if algo == "ia3":
        on_input = layout == 1
        vec = rnd(inp if on_input else out)
        shaped = vec.reshape(1, -1, *[1] * len(kernel)) if conv else vec
        return {"weight": shaped} if layout == 2 else {"weight": shaped, "on_input": torch.tensor(int(on_input))}
    if algo in ("oft", "boft"):
        bsize = 8 if algo == "oft" else 4
        n = out // bsize
        if algo == "boft":
            return {"oft_blocks": rnd(2, n, bsize, bsize, s=0.05), "alpha": torch.tensor(0.0),
                    "rescale": 1 + rnd(out, *[1] * (w.dim() - 1), s=0.1)}
        if layout == 2:  # old LyCORIS: R itself
            return {"oft_diag": torch.eye(bsize) + rnd(n, bsize, bsize, s=0.05)}
        alpha = 1e-3 if layout == 0 else 0.0  # layout 0: the constraint bites
        t = {"oft_blocks": rnd(n, bsize, bsize, s=0.05), "alpha": torch.tensor(alpha)}
        return {**t, "rescale": 1 + rnd(out, *[1] * (w.dim() - 1), s=0.1)} if layout == 1 else t
    raise ValueError(f"unknown algorithm {algo!r}; one of {ALGORITHMS}")


def make_lycoris(model: nn.Module, algo: str, *, seed: int = 0, rank: int = 4, std: float = 0.2,
                 prefix: str = "lora_unet_", ldm: bool = False, dotted: str | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A seeded LyCORIS state dict of ``algo`` (one of :data:`ALGORITHMS`) for ``model``, with kohya names
    (``prefix`` + module path with underscores; LDM block names for a UNet with ``ldm=True``), or diffusers names
    ``{dotted}.{module path}`` when ``dotted`` names the component (``"unet"``)."""
    g = torch.Generator().manual_seed(seed)
    names = unet_ldm_names(model) if ldm and is_unet(model) else {}
    sd: dict[str, torch.Tensor] = {}
    seen: dict[tuple, int] = {}  # layouts cycle per kind of layer, so every kind meets every layout
    for path, module in targets(model, algo).items():
        key = f"{dotted}.{path}" if dotted else prefix + names.get(path, path).replace(".", "_")
        kind = (type(module), tuple(module.weight.shape[2:]))
        i = seen[kind] = seen.get(kind, -1) + 1
        t = _tensors(algo, i % LAYOUTS[algo], module.weight.detach(), module.bias is not None, rank, g, std)
        sd.update({f"{key}.{suffix}": v.to(dtype) if v.is_floating_point() else v for suffix, v in t.items()})
    return sd
