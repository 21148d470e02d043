#!/usr/bin/env python3
"""The stage table of docs/performance.md from `fewstep bench --output` and `bench_torch.py --output` JSONs.

    python tools/bench/table.py OURS.json [OURS2.json …] -- TORCH.json [TORCH2.json …]

One row per (stage, size, dtype) measured by both sides (and by either alone, with a blank for the other):
median seconds, GFLOP, GFLOP/s, share of the matrix-product rate of the same dtype measured in the same run,
peak resident memory, and the ratio fewstep / PyTorch (below 1: fewstep is faster).
"""
import json
import sys


def load(paths):
    rows, matmul = {}, []
    for p in paths:
        r = json.load(open(p))
        matmul += r["matmul"]
        for s in r["stages"]:
            rows[(s["stage"], s["size"], s["dtype"])] = s
    return rows, matmul


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def main():
    args = sys.argv[1:]
    split = args.index("--")
    ours, ours_mm = load(args[:split])
    torch, torch_mm = load(args[split + 1:])
    print("| matrix product n³ | dtype | fewstep GFLOP/s | PyTorch GFLOP/s |")
    print("|---|---|---|---|")
    for m in ours_mm:
        t = next((x for x in torch_mm if x["n"] == m["n"] and x["dtype"] == m["dtype"]), None)
        print(f"| {m['n']} | {m['dtype']} | {m['gflop_per_s']:.1f} | {fmt(t and t['gflop_per_s'], '.1f')} |")
    for t in torch_mm:
        if not any(m["n"] == t["n"] and m["dtype"] == t["dtype"] for m in ours_mm):
            print(f"| {t['n']} | {t['dtype']} | | {t['gflop_per_s']:.1f} |")
    print()
    print("| stage | size | dtype | GFLOP | fewstep s | PyTorch s | ratio | fewstep GFLOP/s (share of peak) "
          "| PyTorch GFLOP/s | fewstep peak MiB | PyTorch peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    order = ["text", "unet", "vae", "taesd", "image", "image-taesd"]
    keys = sorted(set(ours) | set(torch), key=lambda k: (k[2] != "f32", k[1], order.index(k[0])))
    for k in keys:
        o, t = ours.get(k), torch.get(k)
        gflop = (o or t)["gflop"]
        ratio = o["median_s"] / t["median_s"] if o and t else None
        share = f" ({100 * o['share_of_matmul_peak']:.0f} %)" if o and o.get("share_of_matmul_peak") else ""
        print(f"| {k[0]} | {k[1]}² | {k[2]} | {gflop:.1f} | {fmt(o and o['median_s'], '.3f')} "
              f"| {fmt(t and t['median_s'], '.3f')} | {fmt(ratio, '.2f')} "
              f"| {fmt(o and o['gflop_per_s'], '.1f')}{share} | {fmt(t and t['gflop_per_s'], '.1f')} "
              f"| {fmt(o and o['peak_rss_mib'], '.0f')} | {fmt(t and t['peak_rss_mib'], '.0f')} |")


if __name__ == "__main__":
    main()
