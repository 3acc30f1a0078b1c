"""LyCORIS algorithms on SD1.5/SDXL tiny UNets (Linear, 1x1 and 3x3 Conv, norm layers), with kohya names.

Every fused weight (and bias) is compared with the result computed here from the file's raw tensors with plain
formulas (fp64, matrix forms where lorakit uses index forms: block-diagonal and permutation matrices for OFT/BOFT,
N-D ``torch.kron`` for LoKr convs), not with lorakit's own code. Unload restores bit-exactly in fp16/bf16. DoRA in
PEFT format matches diffusers+PEFT.
"""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from helpers import assert_close, family, outputs, write
from lorakit import batched
from lorakit.cli import main
from lorakit.inspection import inspect_file
from lorakit.testing.lycoris import ALGORITHMS, make_lycoris

EPS = torch.finfo(torch.float32).eps


# ------------------------------------------------------------------------------------------------ references
def _groups(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        module, suffix = key.split(".", 1)
        out.setdefault(module, {})[suffix] = t.double()
    return out


def _alpha_scale(t: dict, rank: int) -> float:
    return t["alpha"].item() / rank if "alpha" in t and t["alpha"].item() != 0 else 1.0


def _lora(t, shape):
    return (t["lora_up.weight"].flatten(1) @ t["lora_down.weight"].flatten(1)).reshape(shape) * \
        _alpha_scale(t, t["lora_down.weight"].shape[0])


def _loha(t, shape):
    def side(i):
        a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
        if f"hada_t{i}" in t:  # Tucker: t [r, r, kh, kw], a [r, out], b [r, in]
            return torch.einsum("ijkl,ip,jr->prkl", t[f"hada_t{i}"], a, b)
        return (a @ b).reshape(shape)
    return side(1) * side(2) * _alpha_scale(t, t["hada_w1_b"].shape[0])


def _lokr(t, shape):
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = torch.einsum("ijkl,ip,jr->prkl", t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"]
    if len(shape) == 4:  # LyCORIS: w1 unsqueezed to 4-D, w2 4-D, N-D kron
        w2 = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:])
        w1 = w1[:, :, None, None]
    if "lokr_w1" in t and "lokr_w2" in t:
        scale = 1.0  # both full: alpha ignored
    else:
        scale = _alpha_scale(t, (t.get("lokr_w2_b", t.get("lokr_w1_b"))).shape[0])
    return torch.kron(w1.contiguous(), w2.contiguous()).reshape(shape) * scale


def _rotation(blocks, alpha, out):
    q = blocks - blocks.transpose(-1, -2)
    if alpha:
        norm = q.norm() + 1e-8
        if norm > alpha * out:
            q = q * (alpha * out / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.inverse(eye - q)


def _blend(r, m):
    return m * r + (1 - m) * torch.eye(r.shape[-1], dtype=r.dtype)


def _oft(t, w, m):
    out = w.shape[0]
    w2 = w.reshape(out, -1)
    alpha = t["alpha"].item() if "alpha" in t else 0.0
    if "oft_diag" in t:
        mat = torch.block_diag(*_blend(t["oft_diag"], m).transpose(1, 2))
    elif t["oft_blocks"].dim() == 3:  # W'[k, j] = sum_i R[k, i, j] W[k, i]: block_diag(R_k^T) @ W
        mat = torch.block_diag(*_blend(_rotation(t["oft_blocks"], alpha, out), m).transpose(1, 2))
    else:  # BOFT: per level, permute (c, 2, k) -> (c, k, 2), R per block, permute back
        rs = _rotation(t["oft_blocks"], alpha, out)
        b = rs.shape[-1]
        mat = torch.eye(out, dtype=w.dtype)
        for level in range(rs.shape[0]):
            k = 2 ** level * (b // 2)
            perm = torch.arange(out).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
            p = torch.zeros(out, out, dtype=w.dtype)
            p[torch.arange(out), perm] = 1
            mat = p.T @ torch.block_diag(*_blend(rs[level], m)) @ p @ mat
    new = (mat @ w2).reshape(w.shape)
    if "rescale" in t:
        new = new * t["rescale"].reshape(out, *[1] * (w.dim() - 1))
    return new


def _old_glora(t: dict, shape: tuple) -> bool:
    """ComfyUI's test: factors that fit the old layout, and not the new one unless a2 spans a square weight."""
    a1, a2, b1, b2 = (t[k].reshape(t[k].shape[0], -1).shape for k in ("a1.weight", "a2.weight", "b1.weight",
                                                                       "b2.weight"))
    old = b2[1] == b1[0] == a1[0] == a2[1]
    new = b2[0] == b1[1] == a1[1] == a2[0]
    return old and (not new or a2[0] == shape[0] == shape[1])


def _expected(t: dict, w: torch.Tensor, b: torch.Tensor | None, m: float):
    """(new weight, new bias) of one module at multiplier ``m`` from its raw tensors."""
    shape = tuple(w.shape)
    if "dora_scale" in t:
        inner = {k: v for k, v in t.items() if k != "dora_scale"}
        delta = _lora(inner, shape) if "lora_up.weight" in t else \
            _loha(inner, shape) if "hada_w1_a" in t else _lokr(inner, shape)
        v = w + delta
        g = t["dora_scale"]
        axis = 1 if g.shape[0] == 1 and g.numel() > 1 else 0
        dims = [d for d in range(w.dim()) if d != axis]
        factor = g.reshape([-1 if d == axis else 1 for d in range(w.dim())]) / (v.square().sum(dims, keepdim=True).sqrt() + EPS)
        return v * (1 + m * (factor - 1)), b
    if "hada_w1_a" in t:
        return w + m * _loha(t, shape), b
    if any(k.startswith("lokr_") for k in t):
        return w + m * _lokr(t, shape), b
    if "a1.weight" in t and _old_glora(t, shape):  # W + m * alpha/r * (W @ a2 @ a1 + b2 @ b1), r = a1 rows
        w2 = w.reshape(shape[0], -1)
        diff = w2 @ t["a2.weight"] @ t["a1.weight"] + t["b2.weight"] @ t["b1.weight"]
        return w + m * _alpha_scale(t, t["a1.weight"].shape[0]) * diff.reshape(shape), b
    if "a1.weight" in t:
        a = t["a1.weight"].flatten(1) @ t["a2.weight"].flatten(1)
        wa = (a.T @ w.transpose(0, 1).reshape(shape[1], -1)).reshape(shape[1], shape[0], *shape[2:]).transpose(0, 1)
        if "bm.weight" in t:
            bb = torch.einsum("mnkl,im,nj->ijkl", t["bm.weight"], t["b1.weight"].flatten(1), t["b2.weight"].flatten(1))
        else:
            bb = (t["b1.weight"].flatten(1) @ t["b2.weight"].flatten(1)).reshape(shape)
        return w + m * _alpha_scale(t, t["a2.weight"].shape[0]) * (wa + bb), b
    if "diff" in t or "diff_b" in t or "w_norm" in t:
        dw, db = t.get("diff", t.get("w_norm")), t.get("diff_b", t.get("b_norm"))
        return (w if dw is None else w + m * dw.reshape(shape)), (b if db is None else b + m * db)
    if "weight" in t:  # IA3
        on_input = bool(t["on_input"].item()) if "on_input" in t else False
        vec = t["weight"].flatten()
        view = [1, -1, *[1] * (w.dim() - 2)] if on_input else [-1, *[1] * (w.dim() - 1)]
        return w * (1 + m * vec.reshape(view)), b
    return _oft(t, w, m), b


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def pipe(request):
    fam = family(request.param)
    p = fam.build()
    p.unet.requires_grad_(False)
    lorakit.attach(p)
    p._base = {k: v.clone() for k, v in p.unet.state_dict().items()}
    p._fam = request.param
    yield p


def _restore(p) -> None:
    p.unload_lora_weights()
    p.unet.load_state_dict(p._base)


def _modules(p) -> dict[str, str]:
    """kohya spellings (diffusers and LDM names) -> module path."""
    from lorakit.families import unet_ldm_names
    ldm = unet_ldm_names(p.unet)
    out = {}
    for name, _ in p.unet.named_modules():
        out["lora_unet_" + name.replace(".", "_")] = name
        if name in ldm:
            out["lora_unet_" + ldm[name].replace(".", "_")] = name
    return out


@pytest.mark.parametrize("algo,scale", [(a, 1.0) for a in ALGORITHMS] + [(a, 0.6) for a in ALGORITHMS])
def test_algorithm_fuses_to_the_independent_result(pipe, algo, scale, tmp_path):
    if pipe._fam == "sdxl" and scale != 1.0:
        pytest.skip("the multiplier's effect is checked on SD1.5; SDXL adds LDM names and other widths")
    sd = make_lycoris(pipe.unet, algo, seed=3, ldm=pipe._fam == "sdxl")
    groups = _groups(sd)
    path = write(sd, tmp_path / f"{algo}.safetensors")
    name = pipe.load_lora_weights(path, adapter_name=algo)  # strict: every key used
    assert pipe._lorakit_manager.adapters[name].num_modules() == len(groups)
    pipe.fuse_lora(adapter_names=[algo], lora_scale=scale)
    pipe.unload_lora_weights()  # the fused weights stay
    names = _modules(pipe)
    try:
        worst = 0.0
        for module_key, t in groups.items():
            path = names[module_key]
            w0 = pipe._base[f"{path}.weight"].double()
            b0 = pipe._base.get(f"{path}.bias")
            want_w, want_b = _expected(t, w0, None if b0 is None else b0.double(), scale)
            mod = pipe.unet.get_submodule(path)
            for got, want, base in ((mod.weight, want_w, w0), (mod.bias, want_b, b0)):
                if want is None:
                    continue
                change, want_change = got.detach().double() - base.double(), want - base.double()
                if want_change.norm() == 0:
                    assert torch.equal(got.detach().double(), base.double()), f"{path} changed"
                    continue
                err = ((change - want_change).norm() / want_change.norm()).item()
                worst = max(worst, err)
                assert err < 1e-3, f"{algo} {module_key}: relative error {err:.2e}"
        untouched = set(pipe._base) - {f"{names[k]}.{p}" for k in groups for p in ("weight", "bias")}
        state = pipe.unet.state_dict()
        assert all(torch.equal(state[k], pipe._base[k]) for k in untouched)
    finally:
        _restore(pipe)


@pytest.mark.parametrize("algo,spelling", [("loha", "unet"), ("dora", "unet"), ("norm", "unet"), ("oft", "oft_unet_")])
def test_diffusers_names_and_kohya_oft_prefix(algo, spelling, tmp_path):
    """LyCORIS keys on dotted diffusers paths (``unet.<path>.hada_w1_a``), and kohya OFT's ``oft_unet_`` prefix."""
    fam = family("sd15")
    p = fam.build()
    lorakit.attach(p)
    base = {k: v.clone() for k, v in p.unet.state_dict().items()}
    dotted = spelling if spelling == "unet" else None
    sd = make_lycoris(p.unet, algo, seed=4, dotted=dotted, prefix="oft_unet_")
    kohya = make_lycoris(p.unet, algo, seed=4)  # the same tensors under kohya names: the reference's grouping
    p.load_lora_weights(write(sd, tmp_path / "f.safetensors"), adapter_name="x")
    p.fuse_lora(adapter_names=["x"])
    p.unload_lora_weights()
    assert all(torch.equal(u, v) for u, v in zip(sd.values(), kohya.values(), strict=True))
    assert len(sd) == len(kohya) and not any(k.startswith("lora_unet_") for k in sd)
    for module_key, t in _groups(kohya).items():
        path = _modules(p)[module_key]
        b0 = base.get(f"{path}.bias")
        want_w, want_b = _expected(t, base[f"{path}.weight"].double(), None if b0 is None else b0.double(), 1.0)
        got = p.unet.get_submodule(path)
        assert torch.allclose(got.weight.double(), want_w, rtol=0, atol=1e-4 * want_w.abs().max().item()), path
        if want_b is not None:
            assert torch.allclose(got.bias.double(), want_b, rtol=0, atol=1e-5), path


@pytest.mark.parametrize("suffixes,message", [
    ({"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 32)}, "LoHa factors"),
    ({"oft_blocks": (3, 8, 8)}, "cover 24 channels"),
    ({"lora_down.weight": (4, 64), "lora_up.weight": (64, 4), "dora_scale": (32, 1)}, "dora_scale has shape"),
    ({"diff_b": (64,)}, "no bias"),
    ({"w_norm": (64,)}, "norm"),
])
def test_bad_shapes_are_refused_before_anything_changes(suffixes, message):
    fam = family("sdxl")
    p = fam.build()
    lorakit.attach(p)
    before = {k: v.clone() for k, v in p.unet.state_dict().items()}
    path = next(n for n, m in p.unet.named_modules() if n.endswith("attn1.to_q") and m.weight.shape == (64, 64))
    key = "lora_unet_" + path.replace(".", "_")
    sd = {f"{key}.{s}": torch.ones(shape) for s, shape in suffixes.items()}
    with pytest.raises(lorakit.LoraShapeError, match=message):
        p.load_lora_weights(sd, adapter_name="bad")
    assert all(torch.equal(v, before[k]) for k, v in p.unet.state_dict().items())
    assert p.get_list_adapters() == {}


def test_lokr_2023_conv_layout_folds_the_kernel_into_both_factors(tmp_path):
    """Old LyCORIS LoKr conv files (formats.md #8): 2-D w1 [a, c*x] and w2 [b, d*y] with x*y = kh*kw; the
    [a*b, in*kh*kw] Kronecker product is the weight's 2-D view."""
    fam = family("sd15")
    p = fam.build()
    lorakit.attach(p)
    conv = next(n for n, m in p.unet.named_modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)
                and m.out_channels == 64 and m.in_channels == 32)
    module = p.unet.get_submodule(conv)
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(4, 6, generator=g), torch.randn(16, 48, generator=g) * 0.1  # 4*16 = 64, 6*48 = 32*9
    key = "lora_unet_" + conv.replace(".", "_")
    before = module.weight.detach().double().clone()
    p.load_lora_weights({f"{key}.lokr_w1": w1, f"{key}.lokr_w2": w2, f"{key}.alpha": torch.tensor(7.0)},
                        adapter_name="old")
    p.fuse_lora()
    p.unload_lora_weights()
    want = torch.kron(w1.double(), w2.double()).reshape(64, 32, 3, 3)  # both full: alpha ignored
    assert torch.allclose(module.weight.double() - before, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,mode", [(torch.float16, "merge"), (torch.bfloat16, "branch")], ids=str)
def test_unload_restores_bit_exactly(dtype, mode, monkeypatch):
    """Every algorithm loaded at once (so they mix on shared layers), weights changed, some fused, the mode
    switched, unfused, one deleted, the rest unloaded, with the batched merge path enabled on the CPU: every
    parameter comes back bit-exactly, and state_dict shows the base while adapters are live."""
    monkeypatch.setattr(batched, "DEVICES", ("cpu", "cuda"))
    fam = family("sd15")
    p = fam.build(dtype)
    before = {k: v.clone() for k, v in p.unet.named_parameters()}
    lorakit.attach(p, mode=mode)
    for i, algo in enumerate(ALGORITHMS):
        p.load_lora_weights(make_lycoris(p.unet, algo, seed=5 + i, dtype=dtype), adapter_name=algo)
    p.set_adapters(list(ALGORITHMS), [0.3 + 0.1 * i for i in range(len(ALGORITHMS))])
    shown = p.unet.state_dict()
    assert all(torch.equal(shown[k], v) for k, v in before.items()), "state_dict must show the base"
    p.fuse_lora(adapter_names=["dora", "full", "oft"], lora_scale=0.5)
    p._lorakit_manager.set_mode("merge" if mode == "branch" else "branch")
    p.set_adapters(["loha", "norm", "ia3"], 0.7)
    p.disable_lora()
    assert all(torch.equal(v, before[k]) for k, v in p.unet.named_parameters()), "disabled: the base"
    p.enable_lora()
    p.unfuse_lora()
    p.delete_adapters("norm")
    p.unload_lora_weights()
    for k, v in p.unet.named_parameters():
        assert torch.equal(v, before[k]), f"{k} not restored"


def test_merge_and_branch_modes_agree_when_algorithms_mix(tmp_path):
    """A non-additive algorithm (OFT) on layers that also hold a LoRA-like adapter: both modes give one result."""
    fam = family("sd15")
    results = []
    for mode in ("merge", "branch"):
        p = fam.build()
        lorakit.attach(p, mode=mode)
        p.load_lora_weights(make_lycoris(p.unet, "oft", seed=1), adapter_name="o")
        p.load_lora_weights(make_lycoris(p.unet, "loha", seed=2), adapter_name="h")
        p.set_adapters(["h", "o"], [0.8, 0.9])
        results.append(outputs(p, fam)["denoiser"])
    assert torch.allclose(results[0], results[1], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ DoRA vs PEFT
def _peft_dora_file(ref, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "proj_in"]
    cfg = LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, target_modules=targets)
    torch.manual_seed(0)
    ref.unet.add_adapter(cfg, adapter_name="tmp")
    with torch.no_grad():
        for name, prm in ref.unet.named_parameters():
            if "lora_magnitude_vector" in name:
                prm.mul_(1 + 0.1 * torch.randn_like(prm))
    sd = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(ref.unet, adapter_name="tmp").items()}
    ref.unet.delete_adapters("tmp")
    config = {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": targets}
    meta = {"lora_adapter_metadata": json.dumps({f"unet.{k}": v for k, v in config.items()})}
    return write(sd, tmp_path / "dora.safetensors", metadata=meta), sd


def test_peft_dora_matches_diffusers(tmp_path):
    fam = family("sd15")
    ref, ours = fam.build(), fam.build()
    lorakit.attach(ours)
    path, sd = _peft_dora_file(ref, tmp_path)
    assert any(k.endswith("lora_magnitude_vector") for k in sd)
    base = outputs(ours, fam)
    ref.load_lora_weights(path, adapter_name="d")
    ours.load_lora_weights(path, adapter_name="d")
    assert {m.algorithm for m in inspect_file(path).modules} == {"lora+dora"}
    want = outputs(ref, fam)
    assert (want["denoiser"] - base["denoiser"]).abs().max() > 1e-3
    assert_close(outputs(ours, fam), want, atol=1e-5, what="DoRA weight 1")
    for p in (ref, ours):
        p.set_adapters(["d"], 0.6)
    assert_close(outputs(ours, fam), outputs(ref, fam), atol=1e-5, what="DoRA weight 0.6")
    for p in (ref, ours):
        p.fuse_lora(adapter_names=["d"])
    assert_close(outputs(ours, fam), outputs(ref, fam), atol=1e-5, what="DoRA fused")


# ------------------------------------------------------------------------------------------------ inspect
def test_inspect_names_algorithms_trainer_and_unused_keys(tmp_path, capsys):
    fam = family("sd15")
    p = fam.build()
    sd = {}
    for algo in ("loha", "oft", "boft", "ia3"):
        sd.update(make_lycoris(p.unet, algo, seed=1, prefix=f"lora_unet_{algo}_"))  # distinct module keys
    sd["lora_unet_something.hada_w9"] = torch.zeros(1)
    meta = {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "loha"}),
            "ss_base_model_version": "sd_v1"}
    path = write(sd, tmp_path / "mix.safetensors", metadata=meta)
    report = inspect_file(path)
    assert set(report.algorithms) == {"loha", "oft", "boft", "ia3"}
    assert report.algorithms["boft"] == sum(1 for k in sd if k.startswith("lora_unet_boft_") and
                                           k.endswith(".oft_blocks"))
    assert report.trainer == "LyCORIS (kohya sd-scripts), algo loha"
    assert report.family == "sd1"
    assert report.unused == ["lora_unet_something.hada_w9"]
    assert report.format == "lycoris"
    assert main(["inspect", path]) == 0
    table = capsys.readouterr().out
    assert "LyCORIS (kohya sd-scripts), algo loha" in table and "boft" in table and "hada_w9" in table
