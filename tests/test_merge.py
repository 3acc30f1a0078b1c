"""add_weighted_adapter against PEFT's LoraModel.add_weighted_adapter (the oracle), plus the pure merge math."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorakit import LoraError
from lorakit import merge as M
from lorakit.adapter import Adapter, LokrWeights, LoraWeights
from lorakit.merging import merge_adapters

peft = pytest.importorskip("peft")

DETERMINISTIC = ("linear", "cat", "svd", "ties", "ties_svd", "magnitude_prune", "magnitude_prune_svd")
TARGETS = ["lin", "conv1", "conv3"]


class Tiny(nn.Module):
    """A Linear, a 1x1 conv and a 3x3 conv: every layer kind LoRA merging handles."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 12)
        self.conv1 = nn.Conv2d(6, 8, 1)
        self.conv3 = nn.Conv2d(6, 8, 3)


def peft_pair(ranks=(4, 4), alphas=(8.0, 2.0), seed=0):
    """A PEFT model holding adapters a and b with random A and B, and the same adapters as lorakit Adapters."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(Tiny(), LoraConfig(r=ranks[0], lora_alpha=alphas[0], target_modules=TARGETS),
                           adapter_name="one")
    # b targets two of the three layers: a module held by only some adapters is merged from those
    model.add_adapter("two", LoraConfig(r=ranks[1], lora_alpha=alphas[1], target_modules=["lin", "conv3"],
                                      alpha_pattern={"conv3": alphas[1] * 3}))
    g = torch.Generator().manual_seed(seed)
    ours: dict[str, dict[str, LoraWeights]] = {"one": {}, "two": {}}
    for path in TARGETS:
        layer = model.base_model.model.get_submodule(path)
        for name in ("one", "two"):
            if name not in layer.lora_A:
                continue
            for p in (layer.lora_A[name].weight, layer.lora_B[name].weight):
                p.data = torch.randn(p.shape, generator=g) * 0.3
            ours[name][path] = LoraWeights(down=layer.lora_A[name].weight.detach().clone(),
                                           up=layer.lora_B[name].weight.detach().clone(),
                                           alpha=float(layer.lora_alpha[name]))
    return model, [Adapter(n, {"model": ours[n]}) for n in ("one", "two")]


def peft_deltas(model, name: str) -> dict[str, torch.Tensor]:
    return {p: model.base_model.model.get_submodule(p).get_delta_weight(name).detach() for p in TARGETS}


def our_deltas(adapter: Adapter, model) -> dict[str, torch.Tensor]:
    shapes = {p: model.base_model.model.get_submodule(p).weight.shape for p in TARGETS}
    return {p: d.delta(tuple(shapes[p])) for p, d in adapter.layers["model"].items()}


def assert_rel_close(ours: dict, ref: dict, tol: float = 1e-4, what: str = ""):
    assert set(ours) == set(ref), f"{what}: modules {sorted(ours)} vs {sorted(ref)}"
    for k, want in ref.items():
        err = (ours[k] - want).norm() / want.norm().clamp(min=1e-12)
        assert err <= tol, f"{what} {k}: relative error {err:.2e}"


def shape_of(model):
    return lambda comp, path, ds: tuple(model.base_model.model.get_submodule(path).weight.shape)


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("sign", ["total", "frequency"])
def test_equal_ranks_match_peft(method, sign):
    if sign == "frequency" and "ties" not in method:
        pytest.skip("majority_sign_method only matters for ties")
    model, (a, b) = peft_pair()
    weights = [0.7, -0.4]
    model.add_weighted_adapter(["one", "two"], weights, "m", method, density=0.5, majority_sign_method=sign)
    merged, _ = merge_adapters([a, b], weights, "m", method, density=0.5, majority_sign_method=sign,
                                    shape_of=shape_of(model))
    assert_rel_close(our_deltas(merged, model), peft_deltas(model, "m"), what=method)
    assert all(d.alpha == d.rank for d in merged.layers["model"].values())  # scale 1, as PEFT's new adapter


def test_svd_rank_and_clamp_match_peft():
    model, (a, b) = peft_pair()
    model.add_weighted_adapter(["one", "two"], [1.0, 0.5], "m", "svd", svd_rank=3, svd_clamp=0.9)
    merged, report = merge_adapters([a, b], [1.0, 0.5], "m", "svd", svd_rank=3, svd_clamp=0.9,
                                    shape_of=shape_of(model))
    assert {d.rank for d in merged.layers["model"].values()} == {3}
    assert_rel_close(our_deltas(merged, model), peft_deltas(model, "m"), what="svd clamp")
    assert all(m.error > 0 for m in report.modules)


def test_single_adapter_is_linear_as_peft():
    model, (a, _) = peft_pair()
    model.add_weighted_adapter(["one"], [0.5], "m", "ties", density=0.3)
    merged, _ = merge_adapters([a], [0.5], "m", "ties", density=0.3, shape_of=shape_of(model))
    assert_rel_close(our_deltas(merged, model), peft_deltas(model, "m"), what="single")


def exact_sum(adapters, weights, model):
    out: dict[str, torch.Tensor] = {}
    for a, w in zip(adapters, weights):
        for p, d in our_deltas(a, model).items():
            out[p] = out.get(p, 0) + w * d
    return out


def test_mixed_ranks_cat_exact_and_svd_with_enough_rank():
    model, (a, b) = peft_pair(ranks=(4, 2))
    weights = [0.6, 1.3]
    expected = exact_sum([a, b], weights, model)
    cat, _ = merge_adapters([a, b], weights, "c", "cat", shape_of=shape_of(model))
    assert cat.layers["model"]["lin"].rank == 6
    assert_rel_close(our_deltas(cat, model), expected, tol=1e-5, what="cat")
    svd, report = merge_adapters([a, b], weights, "s", "svd", svd_rank=6, shape_of=shape_of(model))
    assert_rel_close(our_deltas(svd, model), expected, tol=1e-4, what="svd")
    assert report.max_error < 1e-4
    model.add_weighted_adapter(["one", "two"], weights, "c", "cat")  # PEFT agrees on cat with mixed ranks
    assert_rel_close(our_deltas(cat, model), peft_deltas(model, "c"), what="cat vs peft")


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_mixed_ranks_factor_methods_name_the_svd_alternative(method):
    _, (a, b) = peft_pair(ranks=(4, 2))
    with pytest.raises(LoraError, match=f"combination_type='{M.svd_alternative(method)}'"):
        merge_adapters([a, b], [1.0, 1.0], "m", method, density=0.5)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_reproducible_by_seed(method):
    _, (a, b) = peft_pair()
    one, _ = merge_adapters([a, b], [1.0, 0.5], "m", method, density=0.4, seed=3)
    two, _ = merge_adapters([a, b], [1.0, 0.5], "m", method, density=0.4, seed=3)
    other, _ = merge_adapters([a, b], [1.0, 0.5], "m", method, density=0.4, seed=4)
    for p, d in one.layers["model"].items():
        assert torch.equal(d.up, two.layers["model"][p].up) and torch.equal(d.down, two.layers["model"][p].down)
    assert any(not torch.equal(d.down, other.layers["model"][p].down) for p, d in one.layers["model"].items())


@pytest.mark.parametrize("dare,plain", [("dare_linear", "linear"), ("dare_ties", "ties"),
                                        ("dare_linear_svd", "svd"), ("dare_ties_svd", "ties_svd")])
def test_dare_density_one_is_the_plain_method(dare, plain):
    model, (a, b) = peft_pair()
    x, _ = merge_adapters([a, b], [0.8, 0.3], "x", dare, density=1.0, seed=0, shape_of=shape_of(model))
    y, _ = merge_adapters([a, b], [0.8, 0.3], "y", plain, density=1.0, shape_of=shape_of(model))
    assert_rel_close(our_deltas(x, model), our_deltas(y, model), tol=1e-6, what=dare)


def test_dare_keeps_density_fraction_rescaled():
    t = torch.randn(200, 200)
    g = torch.Generator().manual_seed(0)
    pruned = M.prune_random(t, 0.3, g)
    kept = (pruned != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    assert torch.allclose(pruned[pruned != 0], t[pruned != 0] / 0.3)


def test_magnitude_prune_and_sign_election():
    t = torch.tensor([0.1, -3.0, 2.0, 0.5])
    assert torch.equal(M.prune_magnitude(t, 0.5), torch.tensor([0.0, -3.0, 2.0, 0.0]))
    stacked = torch.tensor([[1.0, -1.0, 2.0], [-3.0, -1.0, -1.0], [1.0, 0.0, -0.5]])
    assert M.majority_sign_mask(stacked, "total").tolist() == [[False, True, True], [True, True, False],
                                                               [False, False, False]]
    assert M.majority_sign_mask(stacked, "frequency")[:, 0].tolist() == [True, False, True]
    assert M.disjoint_merge(stacked, M.majority_sign_mask(stacked, "total")).tolist() == [-3.0, -1.0, 2.0]


def test_sources_unchanged_and_errors():
    _, (a, b) = peft_pair()
    before = {p: (d.up.clone(), d.down.clone()) for p, d in a.layers["model"].items()}
    merge_adapters([a, b], [1.0, 1.0], "m", "ties", density=0.5)
    assert all(torch.equal(a.layers["model"][p].up, u) and torch.equal(a.layers["model"][p].down, d)
               for p, (u, d) in before.items())
    with pytest.raises(LoraError, match="needs density"):
        merge_adapters([a, b], [1.0, 1.0], "m", "ties")
    with pytest.raises(LoraError, match="unknown combination_type"):
        merge_adapters([a, b], [1.0, 1.0], "m", "average")
    with pytest.raises(LoraError, match="one weight per adapter"):
        merge_adapters([a, b], [1.0], "m", "svd")
    with pytest.raises(LoraError, match="one number per adapter"):
        merge_adapters([a, b], 0.5, "m", "svd")


def test_lokr_full_delta_for_svd_methods_error_for_factor_methods():
    g = torch.Generator().manual_seed(0)
    lokr = LokrWeights(w1=torch.randn(3, 4, generator=g), w2=torch.randn(4, 4, generator=g))
    lora = LoraWeights(down=torch.randn(2, 16, generator=g), up=torch.randn(12, 2, generator=g))
    a, b = Adapter("a", {"model": {"lin": lokr}}), Adapter("b", {"model": {"lin": lora}})
    merged, _ = merge_adapters([a, b], [1.0, 2.0], "m", "svd", svd_rank=12)
    expected = lokr.delta((12, 16)) + 2 * lora.delta((12, 16))
    assert torch.allclose(merged.layers["model"]["lin"].delta((12, 16)), expected, atol=1e-4)
    with pytest.raises(LoraError, match="LokrWeights.*'ties_svd'"):
        merge_adapters([a, b], [1.0, 1.0], "m", "ties", density=0.5)


@pytest.mark.parametrize("shape", [(40, 12), (12, 40)])
def test_top_singular_is_the_truncated_svd(shape):
    d = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    up, down, S = M.top_singular(d, 5)
    U, S_ref, Vh = torch.linalg.svd(d, full_matrices=False)
    assert torch.allclose(S, S_ref, atol=1e-5)
    assert torch.allclose(up @ down, (U[:, :5] * S_ref[:5]) @ Vh[:5], atol=1e-5)
    assert torch.allclose(down @ down.T, torch.eye(5), atol=1e-5)  # down = Vh_k, up = U_k * S_k as PEFT splits
    assert abs(M.relative_error(S, 5) - ((d - up @ down).norm() / d.norm()).item()) < 1e-5
