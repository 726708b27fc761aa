"""What computing only the CLS position of the last shared block saves (`SharedBlock(..., cls_only=True)`).

    python bench/shared_block.py                        # the demo's and the paper's shapes
    python bench/shared_block.py --small --json o.json  # tiny shapes: a smoke run

The losses read the last shared block's CLS output and its first MLP layer's CLS (`x_interm`) only,
so a model without an ITM head computes that position alone: the keys and values of every token, the
query, attention output and MLP of one. Each shape runs the block's forward and backward (into the
block's weights and its input, as in training, where the tower below it trains), full sequence
(the baseline) and CLS only, alternating, in the same process; printed: device, batch, tokens, width,
milliseconds a step of each, the speed-up, and the largest difference between the two outputs and
input gradients (float noise). On a CPU the paper's shape runs at batch 8.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from unialign.files import write_json_atomic
from unialign.machine import machine_info
from unialign.model.smke import SharedBlock

# name: (batch, tokens, width, heads)
SHAPES = {
    "demo image side (ViT-S/14, 112 px)": (32, 65, 384, 6),
    "demo text side (24 tokens)": (32, 24, 384, 6),
    "paper image side (ViT-B/16, 224 px)": (256, 197, 768, 12),
}
SMALL = {"tiny": (4, 17, 64, 4)}


def _step(block: SharedBlock, x: torch.Tensor, cls_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, interm = block(x, cls_only=cls_only)
    (out[:, 0].sum() + interm.sum()).backward()
    return out[:, 0].detach(), x.grad.detach()


def measure(batch: int, tokens: int, width: int, heads: int, repeats: int, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    block = SharedBlock(width, heads, 4.0, 0.2).to(device).train()
    x = torch.randn(batch, tokens, width, device=device, requires_grad=True)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    results = {}
    for i in range(repeats + 1):  # the first of each is a warm-up
        for cls_only in (False, True):
            x.grad = None
            block.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[cls_only] = _step(block, x, cls_only)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i:
                seconds[cls_only].append(time.perf_counter() - start)
    full, cls = (sorted(seconds[k])[len(seconds[k]) // 2] for k in (False, True))  # medians
    return {"batch": batch, "tokens": tokens, "width": width, "heads": heads, "repeats": repeats,
            "full_ms": round(1e3 * full, 3), "cls_only_ms": round(1e3 * cls, 3), "speedup": round(full / cls, 2),
            "max_abs_diff_output": float((results[False][0] - results[True][0]).abs().max()),
            "max_abs_diff_input_grad": float((results[False][1] - results[True][1]).abs().max())}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="tiny shapes: a smoke run")
    p.add_argument("--repeats", type=int, default=None, help="timed steps of each (default: 20; --small: 2)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = args.repeats or (2 if args.small else 20)
    shapes = SMALL if args.small else SHAPES
    info = machine_info()
    result: dict[str, Any] = {"bench": "shared_block", "small": args.small,
                              "device": info["gpu"] or f"CPU ({info['cpu']}, {info['cores']} cores)",
                              "baseline": "the full last block (every position)", "shapes": {}}
    print(f"device: {result['device']}; forward + backward of one shared block, median of {repeats} steps")
    print("| shape | batch | tokens | width | full ms | CLS-only ms | speed-up | max diff (out, grad) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (batch, tokens, width, heads) in shapes.items():
        if device.type == "cpu" and batch * tokens * width > 4e6:
            batch = 8  # the paper's batch takes a minute a step on a CPU; the ratio is what is measured
        r = result["shapes"][name] = measure(batch, tokens, width, heads, repeats, device)
        print(f"| {name} | {batch} | {tokens} | {width} | {r['full_ms']} | {r['cls_only_ms']} | {r['speedup']}x | "
              f"{r['max_abs_diff_output']:.1e}, {r['max_abs_diff_input_grad']:.1e} |")
    if args.json:
        write_json_atomic(args.json, result)
    return result


if __name__ == "__main__":
    main()
