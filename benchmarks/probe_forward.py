"""GPU probe: lorakit's merged forward against a pristine SDXL UNet (interleaved), and the cost of a switch.

bench.py times PEFT and lorakit in lock-step; this probe answers one question with less noise: does a UNet with 1 or
4 active lorakit adapters run at the speed of an untouched UNet measured in the same loop? It also times
``set_adapters`` alone and with its first forward, and a forward whose call-time scale changes each call.

Run on the GPU machine (see benchmarks/README.md for the wheels): ``python3 benchmarks/probe_forward.py``;
``--mode branch`` runs lorakit's runtime branches instead of merged weights.
"""
import argparse
import torch, statistics, lorakit, types
from lorakit.testing import models as tm
from lorakit.testing.loras import make_lora, to_state_dict, TRANSFORMER_TARGETS
parser = argparse.ArgumentParser(); parser.add_argument("--mode", default="merge", choices=("merge", "branch"))
parser.add_argument("--profile", action="store_true", help="kernel table of one forward with 4 adapters, then stop")
ARGS = parser.parse_args(); MODE = ARGS.mode
print("lorakit mode", MODE)
dev="cuda"; dt=torch.float16
with torch.no_grad():
    unet=tm.sdxl_unet(device=dev, dtype=dt)
    pipe=types.SimpleNamespace(unet=unet)
    m=lorakit.attach(pipe, mode=MODE)
    g=torch.Generator(device=dev).manual_seed(0)
    x=torch.randn(2,4,128,128,device=dev,dtype=dt); t=torch.tensor([500,500],device=dev); e=torch.randn(2,77,2048,device=dev,dtype=dt)
    ac={"text_embeds":torch.randn(2,1280,device=dev,dtype=dt),"time_ids":torch.tensor([[1024.,1024,0,0,1024,1024]]*2,device=dev,dtype=dt)}
    def fwd(): return unet(x,t,e,added_cond_kwargs=ac,return_dict=False)[0]
    def timeit(fn, n=5):
        ts=[]
        for _ in range(n):
            s=torch.cuda.Event(enable_timing=True); en=torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(); s.record(); fn(); en.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(en))
        return statistics.median(ts)
    for _ in range(3): fwd()
    sds=[to_state_dict(make_lora(unet, rank=32, seed=i, targets=TRANSFORMER_TARGETS, dtype=dt), "peft", "unet") for i in range(4)]
    for i,sd in enumerate(sds): pipe.load_lora_weights(sd, adapter_name=f"a{i}")
    pristine=tm.sdxl_unet(device=dev, dtype=dt)
    def fwd_p(): return pristine(x,t,e,added_cond_kwargs=ac,return_dict=False)[0]
    for _ in range(2): fwd_p()
    res={"base":[], "1":[], "4":[], "disabled":[]}
    for r in range(4):
        res["base"].append(timeit(fwd_p))
        pipe.set_adapters("a0"); res["1"].append(timeit(fwd))
        pipe.disable_lora(); res["disabled"].append(timeit(fwd)); pipe.enable_lora()
        pipe.set_adapters(["a0","a1","a2","a3"],[0.5,0.6,0.7,0.8]); res["4"].append(timeit(fwd))
    print({k: round(statistics.median(v),2) for k,v in res.items() if v})
    if ARGS.profile:
        for label, names in (("4 adapters", ["a0","a1","a2","a3"]), ("1 adapter", ["a0"])):
            pipe.set_adapters(names); fwd(); torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
                fwd(); torch.cuda.synchronize()
            print(label); print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            fwd_p(); torch.cuda.synchronize()
        print("pristine"); print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8))
        raise SystemExit
    # switch cost
    ws=[]; 
    for i in range(6):
        w=[0.5+0.1*i]*4
        ws.append(timeit(lambda: pipe.set_adapters(["a0","a1","a2","a3"], w), n=1))
    print("set_adapters 4 (ms)", [round(v,1) for v in ws])
    ws=[timeit(lambda: pipe.set_adapters("a0", 0.3+0.1*i), n=1) for i in range(6)]
    print("set_adapters 1 (ms)", [round(v,1) for v in ws])
    def first_fwd(i):
        pipe.set_adapters("a0", 0.3+0.1*i); fwd()
    ws=[timeit(lambda: first_fwd(i), n=1) for i in range(6)]
    print("set_adapters 1 + first forward (ms)", [round(v,1) for v in ws], "plain fwd", round(timeit(fwd),1))
    def scaled(i): unet(x,t,e,added_cond_kwargs=ac,cross_attention_kwargs={"scale":0.5+0.05*i},return_dict=False)
    ws=[timeit(lambda: scaled(i), n=1) for i in range(6)]
    print("call-time scale forward (ms)", [round(v,1) for v in ws])
