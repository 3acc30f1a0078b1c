"""GPU probe: ways to run a stacked LoRA branch in an eager SDXL UNet, against the untouched UNet, interleaved.

Each targeted Linear (lorakit's 722 transformer-block layers) gets its forward replaced by one variant of
``out = linear(x, W, b) + ((x @ A^T) * s) @ B^T`` with A [R, in], B [out, R] (R = ``--rank``, 4 adapters of 32 by
default). The variants differ in kernels and host work per layer:

- ``four``: linear, shrink, scale in place, addmm_ of the expand into the output (lorakit's branch until session 7);
- ``scaledB``: linear, shrink, addmm_ with a B that already holds the scales (3 kernels);
- ``wide``: one linear against ``[W; s*A]`` (and bias ``[b; 0]``) gives the output and the hidden in one GEMM, then
  addmm_ of the expand into the output's columns (2 kernels; the output is a strided view): lorakit.wide's path.

- ``shared``: ``wide``, and layers of one attention module that take the same input (to_q/to_k/to_v of self-
  attention, to_k/to_v of cross-attention) share one GEMM against ``[Wq; Wk; Wv; s*Aq; s*Ak; s*Av]`` and one addmm_
  against the block-diagonal up factors: the first of them computes all, the others return their columns;
- ``shared3``: as ``shared`` with one addmm_ per layer (no block-diagonal waste, two more kernels per group).

- ``lorakit 4`` / ``lorakit 1``: a second UNet with the same weights, ``lorakit.attach(mode="branch")``, four
  rank-``rank/4`` adapters loaded, all four or one of them active (the first forward after each switch rewrites the
  rows: one of the three timed per round).

Prints medians of CUDA-event times of a full UNet forward per variant, and of host time (the forward's wall time
without a sync). Run on the GPU machine (wheels: benchmarks/README.md): ``python3 benchmarks/branch_variants.py``.
"""
import argparse
import statistics
import time

import types

import torch
import torch.nn.functional as F

import lorakit
from lorakit.testing import models as tm
from lorakit.testing.loras import TRANSFORMER_TARGETS, make_lora, to_state_dict

parser = argparse.ArgumentParser()
parser.add_argument("--rank", type=int, default=128)
parser.add_argument("--rounds", type=int, default=6)
parser.add_argument("--latent", type=int, default=128, help="latent side (128: 1024 px; 32: a host-bound step)")
parser.add_argument("--check", action="store_true", help="lorakit 4's wide path against its plain branch (grad on)")
parser.add_argument("--profile", action="store_true", help="then cProfile one forward of wide and lorakit 4")
parser.add_argument("--paired", type=int, default=0, metavar="N",
                    help="instead: N rounds of base, wide, shared, lorakit 4 and lorakit 1, one untimed and one timed "
                         "forward each per round; medians of each round's ratio to its own base (robust to a host whose speed drifts)")
parser.add_argument("--profile-switch", action="store_true", help="only cProfile lorakit's first forward after a switch")
args = parser.parse_args()
dev, dt = "cuda", torch.float16
torch.manual_seed(0)
with torch.no_grad():
    unet = tm.sdxl_unet(device=dev, dtype=dt)
    named = [(n, m) for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TRANSFORMER_TARGETS)]
    layers = [m for _, m in named]
    print(len(layers), "layers, rank", args.rank)
    R = args.rank
    fac = []
    for m in layers:
        n, k = m.weight.shape
        a = torch.randn(R, k, device=dev, dtype=dt) * 0.01
        b = torch.randn(n, R, device=dev, dtype=dt) * 0.01
        s = torch.rand(R, device=dev, dtype=dt)
        wide = torch.cat([m.weight, a * s[:, None]])
        wb = None if m.bias is None else torch.cat([m.bias, torch.zeros(R, device=dev, dtype=dt)])
        fac.append((m, m.weight, m.bias, a, b, s, (b * s).t().contiguous(), wide, wb, n))

    def four(W, bias, a, b, s, bst, wide, wb, n):
        def f(x):
            out = F.linear(x, W, bias)
            h = F.linear(x, a)
            h.mul_(s)
            out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), b.t())
            return out
        return f

    def scaledB(W, bias, a, b, s, bst, wide, wb, n):
        def f(x):
            out = F.linear(x, W, bias)
            h = F.linear(x, a)
            out.view(-1, n).addmm_(h.view(-1, R), bst)
            return out
        return f

    def widef(W, bias, a, b, s, bst, wide, wb, n):
        up, sizes = b.t().contiguous(), (n, R)

        def f(x):
            y, h = F.linear(x, wide, wb).split_with_sizes(sizes, -1)
            y.view(-1, n).addmm_(h.view(-1, R), up)
            return y
        return f

    def shared_groups():
        """(leader, followers) per attention module: the layers that take the same input."""
        by_name = dict(zip([n for n, _ in named], fac))
        groups = []
        for n, mod in unet.named_modules():
            if type(mod).__name__ != "Attention":
                continue
            names = ("to_q", "to_k", "to_v") if not mod.is_cross_attention else ("to_k", "to_v")
            groups.append([by_name[f"{n}.{c}"] for c in names])
        return groups

    def make_shared(group, single):
        mods = [g[0] for g in group]
        outs = [g[9] for g in group]
        ws = torch.cat([g[1] for g in group] + [g[3] * g[5][:, None] for g in group])
        ups = [g[4].t().contiguous() for g in group]
        if single:
            up = torch.block_diag(*[g[4] for g in group]).t().contiguous()
        sizes, total, rr = (sum(outs), R * len(group)), sum(outs), R * len(group)
        cache = {}

        def lead(x):
            y, h = F.linear(x, ws).split_with_sizes(sizes, -1)
            if single:
                y.view(-1, total).addmm_(h.view(-1, rr), up)
                parts = y.split_with_sizes(outs, -1)
            else:
                parts = y.split_with_sizes(outs, -1)
                hs = h.split(R, -1)
                for p_, h_, u in zip(parts, hs, ups):
                    p_.view(-1, p_.shape[-1]).addmm_(h_.reshape(-1, R), u)
            cache["x"], cache["parts"] = x, parts
            return parts[0]

        def follow(i, own):
            def f(x):
                if cache.get("x") is x:
                    return cache["parts"][i]
                return own(x)
            return f
        return {mods[0]: lead, **{m: follow(i, widef(*g[1:])) for i, (m, g) in enumerate(zip(mods, group)) if i}}

    class Shared:
        def __init__(self, single):
            self.single = single

        def install(self):
            done = {}
            for g in shared_groups():
                done.update(make_shared(g, self.single))
            for m, *rest in fac:
                m.forward = done.get(m) or widef(*rest)

    variants = {"base": None, "four": four, "scaledB": scaledB, "wide": widef, "shared": Shared(True),
                "shared3": Shared(False)}
    lk = tm.sdxl_unet(device=dev, dtype=dt)
    pipe = types.SimpleNamespace(unet=lk)
    lorakit.attach(pipe, mode="branch")
    for i in range(4):
        made = make_lora(lk, rank=R // 4, seed=i, targets=TRANSFORMER_TARGETS, dtype=dt)
        pipe.load_lora_weights(to_state_dict(made, "peft", "unet"), adapter_name=f"a{i}")
    sets = {"lorakit 4": (["a0", "a1", "a2", "a3"], [0.5, 0.6, 0.7, 0.8]), "lorakit 1": (["a0"], [0.8])}

    def install(v):
        if isinstance(v, Shared):
            return v.install()
        for m, *rest in fac:
            if v is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = v(*rest)

    x = torch.randn(2, 4, args.latent, args.latent, device=dev, dtype=dt); t = torch.tensor([500, 500], device=dev)
    e = torch.randn(2, 77, 2048, device=dev, dtype=dt)
    ac = {"text_embeds": torch.randn(2, 1280, device=dev, dtype=dt),
          "time_ids": torch.tensor([[1024., 1024, 0, 0, 1024, 1024]] * 2, device=dev, dtype=dt)}

    def fwd(model=unet):
        return model(x, t, e, added_cond_kwargs=ac, return_dict=False)[0]

    def prepare(name):
        if name in sets:
            pipe.set_adapters(*sets[name])
            return lambda: fwd(lk)
        install(variants[name])
        return fwd

    if args.profile_switch:  # where the first forward after a switch spends its host time
        import cProfile
        import pstats
        for name in ("lorakit 4", "lorakit 1", "lorakit 4", "lorakit 1"):
            prepare(name)(); prepare(name)()
        torch.cuda.synchronize()
        for name in ("lorakit 4", "lorakit 1"):
            run = prepare(name)
            prof = cProfile.Profile(); prof.enable(); run(); prof.disable(); torch.cuda.synchronize()
            print("first forward after switching to", name); pstats.Stats(prof).sort_stats("tottime").print_stats(14)
        raise SystemExit
    if args.paired:
        runs = {"base": None, "wide": None, "shared": None, "lorakit 4": "lorakit 4", "lorakit 1": "lorakit 1"}
        ratios = {k: [] for k in runs}
        steps = {k: [] for k in runs}
        for r in range(args.paired + 1):
            times = {}
            for name, run in runs.items():
                if run is None:
                    install(variants[name])
                    run = fwd
                elif isinstance(run, str):
                    run = prepare(run)  # a switch of lorakit's set (rewrites its rows at the next forward)
                run()  # (untimed: the first after an install or a switch)
                torch.cuda.synchronize()
                s0 = torch.cuda.Event(enable_timing=True); s1 = torch.cuda.Event(enable_timing=True)
                s0.record(); run(); s1.record(); torch.cuda.synchronize()
                times[name] = s0.elapsed_time(s1)
            if r:  # (round 0: warm-up)
                for name in runs:
                    ratios[name].append(times[name] / times["base"]); steps[name].append(times[name])
        print(f"paired: {args.paired} rounds, each variant's step over the same round's base step")
        for name in runs:
            q = statistics.quantiles(ratios[name], n=4)
            print(f"{name:9s} median {statistics.median(ratios[name]):.3f}x base (quartiles {q[0]:.3f}-{q[2]:.3f}), "
                  f"step median {statistics.median(steps[name]):7.2f} ms, min {min(steps[name]):7.2f} ms")
        raise SystemExit
    outs = {}
    for name in [*variants, *sets]:
        run = prepare(name); outs[name] = run().float(); run()
    ref = outs["four"]
    print("max |variant - four|:", {k: float((o - ref).abs().max()) for k, o in outs.items()},
          "effect", float((outs["base"] - ref).abs().max()))
    names = [*variants, *sets]
    gpu = {k: [] for k in names}; host = {k: [] for k in names}; first = {k: [] for k in names}
    for r in range(args.rounds):
        for name in names:
            run = prepare(name)
            for i in range(4):
                torch.cuda.synchronize()
                s0 = torch.cuda.Event(enable_timing=True); s1 = torch.cuda.Event(enable_timing=True)
                s0.record(); h0 = time.perf_counter(); run(); h1 = time.perf_counter(); s1.record()
                torch.cuda.synchronize()
                if i == 0:  # the first forward after prepare (lorakit: a switch) apart
                    first[name].append(s0.elapsed_time(s1))
                else:
                    gpu[name].append(s0.elapsed_time(s1)); host[name].append((h1 - h0) * 1e3)
    b = statistics.median(gpu["base"]); bmin = min(gpu["base"])
    print("medians of forwards 2-4 after each prepare; 'first': the forward right after it; 'min': the fastest "
          "forward (a noisy host only adds time)")
    for name in names:
        g = statistics.median(gpu[name]); h = statistics.median(host[name]); m = min(gpu[name])
        print(f"{name:9s} step {g:7.2f} ms ({g / b:.3f}x base)   min {m:7.2f} ms ({m / bmin:.3f}x)   "
              f"host {h:7.2f} ms   first {statistics.median(first[name]):7.2f}")
    if args.check:  # with grad enabled lorakit runs the plain branch (shrink, scale, expand)
        run = prepare("lorakit 4")
        fast = run().float()
        with torch.enable_grad():
            plain = run().detach().float()
        print(f"lorakit 4, wide vs plain branch: max |diff| {float((fast - plain).abs().max()):.3e}, LoRA effect "
              f"{float((plain - outs['base']).abs().max()):.3e}, wide layers "
              f"{sum(ly.wide is not None for ly in pipe._lorakit_manager.states['unet'].layers.values())}")
    if args.profile:  # host time per function: lorakit against the same kernels written by hand
        import cProfile
        import pstats
        for name in ("wide", "lorakit 4"):
            run = prepare(name); run(); run(); torch.cuda.synchronize()
            prof = cProfile.Profile(); prof.enable(); run(); prof.disable(); torch.cuda.synchronize()
            print(name); pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        import timeit
        state = pipe._lorakit_manager.states["unet"]
        path, layer = next((p, ly) for p, ly in state.layers.items() if ly.wide is not None)
        mod = layer.module
        xs = torch.randn(1, 16, mod.in_features, device=dev, dtype=dt)
        install(variants["wide"])
        cmod = unet.get_submodule(path)  # the same layer of the hand-written UNet
        used, up = layer.wide.used, layer.wide.up
        used_own, up_own = used.clone(), up.clone()
        h = torch.randn(16, up.shape[0], device=dev, dtype=dt)
        yy = torch.randn(16, up.shape[1], device=dev, dtype=dt)
        for stmt in ("mod(xs)", "cmod(xs)", "mod.forward(xs)", "cmod.forward(xs)", "layer.wide_for(mod, xs)",
                     "layer.wide(xs)", "layer.wide.homed(mod)", "layer.wide.ready(mod, xs, *layer.live())",
                     "F.linear(xs, used)", "F.linear(xs, used_own)", "yy.addmm_(h, up)", "yy.addmm_(h, up_own)"):
            n = 2000
            v = min(timeit.repeat(stmt, globals=globals(), number=n, repeat=3)) / n * 1e6
            torch.cuda.synchronize()
            print(f"{v:7.2f} us  {stmt}  ({path})")
