"""The Triton kernels of :mod:`lorakit.kernels` (imported on first use: importing Triton costs ~0.16 s, which a
CPU-only session never needs). The host side, the checks and the tables are in :mod:`lorakit.kernels`."""

import triton
import triton.language as tl


@triton.jit
def merge_kernel(anchor, out_offsets, base_offsets, up, down, M, N, K, up_stride, down_stride,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    layer = tl.program_id(2).to(tl.int64)
    # Each layer's weight and backup as element offsets from one aligned tensor, each a multiple of 16 (checked
    # on the host): the compiler then knows every row is 16-byte aligned and vectorises the loads and stores,
    # which addresses read from a table would not allow (1.7-2.2x the bandwidth, benchmarks/merge_bandwidth.py).
    out = anchor + tl.multiple_of(tl.load(out_offsets + layer), 16)
    base = anchor + tl.multiple_of(tl.load(base_offsets + layer), 16)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    at = rows[:, None].to(tl.int64) * N + cols[None, :]
    held = tl.load(base + at, mask=inside, other=0.0)  # issued first: in flight during the product
    up_tile = up + layer * up_stride + rows[:, None] * K
    down_tile = down + layer * down_stride + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + tl.arange(0, BLOCK_K)
        a = tl.load(up_tile + kk[None, :], mask=(rows[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(down_tile + kk[:, None] * N, mask=(kk[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    acc += held.to(tl.float32)
    tl.store(out + at, acc.to(anchor.dtype.element_ty), mask=inside)


@triton.jit
def group_kernel(anchor, table, mults, LAYERS, WIDTH, MULTS_WIDTH,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SEARCH: tl.constexpr):
    # One program per tile of any layer of the group. The layers differ in shape and adapters: each has a row of
    # ``table`` (see group_tables) whose first column is its first tile; a binary search over that column
    # finds this program's layer (SEARCH steps: 2**SEARCH > LAYERS).
    tile = tl.program_id(0)
    member = tile * 0  # (a tensor, not a constant: it is reassigned in the loop)
    for step in tl.static_range(SEARCH):  # (a name of its own: Triton types loop-carried names)
        probe = member + (1 << (SEARCH - 1 - step))
        start = tl.load(table + probe.to(tl.int64) * WIDTH, mask=probe < LAYERS, other=tile + 1)
        member = tl.where(start <= tile, probe, member)
    member = member.to(tl.int64)
    weights = mults + member * MULTS_WIDTH
    if tl.load(weights + MULTS_WIDTH - 1) != 0:  # the last column flags the layers this switch rewrites
        row = table + member * WIDTH
        # Index math on tiles in int32, as the chunk kernel's (program ids): the table's entries are int64, and
        # left as they are they made every element's address arithmetic 64-bit (group_tables keeps each layer's
        # M * N, M * rank and rank * N below 2**31)
        local = (tile - tl.load(row)).to(tl.int32)
        M = tl.load(row + 1).to(tl.int32)
        N = tl.multiple_of(tl.load(row + 2).to(tl.int32), 16)
        out = anchor + tl.multiple_of(tl.load(row + 3), 16)
        base = anchor + tl.multiple_of(tl.load(row + 4), 16)
        adapters = tl.load(row + 5)
        tiles_n = tl.cdiv(N, BLOCK_N)
        rows = (local // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (local % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        at = rows[:, None] * N + cols[None, :]
        held = tl.load(base + at, mask=inside, other=0.0)  # issued first: in flight during the products
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        touched = member * 0
        for j in range(adapters):
            scale = tl.load(weights + j)
            # A layer's row lists every adapter loaded on it; those not in the mix have multiplier 0 and are
            # skipped, so that one table serves every adapter set (plan.KernelLayout)
            if scale != 0:
                # (factors off alignment would need scalar loads: a variant that had them took a 4-adapter SDXL
                # switch from ~12 to ~55 ms; such layers take the chunk route, see group_tables)
                up = anchor + tl.multiple_of(tl.load(row + 6 + 3 * j), 16)
                down = anchor + tl.multiple_of(tl.load(row + 7 + 3 * j), 16)
                rank = tl.multiple_of(tl.load(row + 8 + 3 * j).to(tl.int32), 16)
                for k in range(0, rank, BLOCK_K):
                    kk = k + tl.arange(0, BLOCK_K)
                    a = tl.load(up + rows[:, None] * rank + kk[None, :],
                                mask=(rows[:, None] < M) & (kk[None, :] < rank), other=0.0)
                    # the multiplier in fp32, rounded once to the weight's dtype: as the per-layer path scales up
                    a = (a.to(tl.float32) * scale).to(anchor.dtype.element_ty)
                    b = tl.load(down + kk[:, None] * N + cols[None, :],
                                mask=(kk[:, None] < rank) & (cols[None, :] < N), other=0.0)
                    acc += tl.dot(a, b)
                touched += 1
        if touched != 0:
            acc += held.to(tl.float32)
            tl.store(out + at, acc.to(anchor.dtype.element_ty), mask=inside)
        else:  # nothing in the mix here: the backup itself, bit for bit (base + 0.0 would turn -0.0 into 0.0)
            tl.store(out + at, held, mask=inside)
