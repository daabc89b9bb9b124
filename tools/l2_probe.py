# How much faster is a batch-1 GEMV whose weights sit in L2? torch.mv on bf16 matrices
# of the o-projection / q|k|v shapes: the same matrix replayed (warm L2) vs 48 matrices
# in turn (each read from DRAM), both in CUDA graphs of 48 launches.
import torch
torch.manual_seed(0)
for rows, cols in [(2048, 4096), (5120, 2048), (576, 1536)]:
    Ws = [torch.randn(rows, cols, dtype=torch.bfloat16, device="cuda") for _ in range(48)]
    x = torch.randn(cols, dtype=torch.bfloat16, device="cuda")
    res = {}
    for mode in ["cold", "warm"]:
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            for _ in range(3):
                [torch.mv(Ws[i if mode == "cold" else 0], x) for i in range(48)]
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            ys = [torch.mv(Ws[i if mode == "cold" else 0], x) for i in range(48)]
        for _ in range(5): g.replay()
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(50): g.replay()
        e1.record(); torch.cuda.synchronize()
        us = e0.elapsed_time(e1) * 1000 / 50 / 48
        res[mode] = us
    mb = rows * cols * 2 / 1e6
    print(f"torch.mv {rows}x{cols} ({mb:.1f} MB): DRAM {res['cold']:.2f} us ({mb/res['cold']:.2f} TB/s), L2 {res['warm']:.2f} us ({mb/res['warm']:.2f} TB/s)")
