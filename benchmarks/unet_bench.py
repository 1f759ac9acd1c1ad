"""UNet step benchmark (docs/performance.md): one UNet call on 1, 2 and 4 rows, ours
against diffusers' UNet2DConditionModel with the same weights, and the 4-row editing step with a
Prompt-to-Prompt-style self-attention replacement done both ways: ours through the fused
row-gathering attention, the reference's way by materialising every attention map
(softmax(QK^T) per head, then the target's map replaced by the source's, then a batched matmul).

    python benchmarks/unet_bench.py                       # CPU: SD-1.4 widths at 256 px
    python benchmarks/unet_bench.py --device cuda --dtype fp16 --size 512 --out results/

Prints a table and writes unet-<config>-<size>px-<device>.{json,md} into --out (default: the
current directory; benchmarks/results/ holds the runs this repository records). Outputs of the two
implementations are compared before timing (a faster step that computes something else is no win).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.commands import add_out_option  # noqa: E402
from benchmarks.diffusers_nets import diffusers_unet, to_diffusers_unet  # noqa: E402
from benchmarks.common import device_name, markdown_table, measure, slug, write_results  # noqa: E402
from kernels.attention import fused_attention_rows  # noqa: E402
from ldm.config import SD14, TINY  # noqa: E402
from control.base import ControllerBase  # noqa: E402
from ldm.context import AttnContext, BatchLayout, RunInfo  # noqa: E402
from ldm.model import build_networks, random_state_dict  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class SelfReplace(ControllerBase):
    """P2P's self-attention replacement on the conditional target row, the fused way."""

    def start(self, run: RunInfo) -> None:
        rows = list(range(len(run.layout)))
        src, tgt = run.layout.index("source", "cond"), run.layout.index("target", "cond")
        qk = [src if i == tgt else i for i in rows]
        self.rows = (run.row_index(qk), run.row_index(qk), run.row_index(rows))

    def attend(self, q, k, v, site, ctx):
        if site.kind != "self" or q.shape[2] > 1024:
            return None
        return fused_attention_rows(q, k, v, *self.rows)


class MaterialisingProcessor:
    """diffusers attention processor computing attention the reference's way: explicit maps,
    and for self-attention at <= 1024 tokens the conditional target row's maps replaced by the
    source's (rows [u_src, u_tgt, c_src, c_tgt])."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        is_self = encoder_hidden_states is None
        context = hidden_states if is_self else encoder_hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(context))
        v = attn.head_to_batch_dim(attn.to_v(context))
        probs = (q @ k.transpose(1, 2) * attn.scale).softmax(dim=-1)  # (B*heads, N, M): the big map
        if is_self and q.shape[1] <= 1024 and probs.shape[0] == 4 * attn.heads:
            h = attn.heads
            probs = probs.clone()
            probs[3 * h : 4 * h] = probs[2 * h : 3 * h]
        out = attn.batch_to_head_dim(probs @ v)
        return attn.to_out[1](attn.to_out[0](out))


def diffusers_unet_like(ours_cfg, state):
    """diffusers' UNet holding `state` (our names), built on the meta device and assigned."""
    with torch.device("meta"):
        ref = diffusers_unet(ours_cfg)
    ref.load_state_dict(to_diffusers_unet(state, ref), strict=True, assign=True)
    return ref.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="weights and inputs (default: fp16 on CUDA, fp32 on CPU)"
    )
    parser.add_argument(
        "--config", choices=["sd14", "tiny"], default="sd14", help="UNet widths, random weights (default: %(default)s)"
    )
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: 512 on CUDA, 256 on CPU)")
    parser.add_argument(
        "--rows", type=int, nargs="+", default=[1, 2, 4], help="batch rows per timed call (default: 1 2 4)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls, the median is reported (default: 20 on CUDA, 3 on CPU)"
    )
    add_out_option(parser)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("fp16" if cuda else "fp32")]
    size = args.size or (512 if cuda else 256)
    warmup, repeats = args.warmup or (3 if cuda else 1), args.repeats or (20 if cuda else 3)
    config = SD14 if args.config == "sd14" else TINY

    ours = build_networks(config)["unet"]
    state = random_state_dict(ours, torch.Generator().manual_seed(0), dtype)
    ours.load_state_dict(state, assign=True)
    ours = ours.eval().to(device)
    ref = diffusers_unet_like(config.unet, state).to(device)

    side = size // 8
    g = torch.Generator().manual_seed(1)
    rows_out, results = [], {}
    with torch.no_grad():
        for rows in args.rows:
            x = torch.randn(rows, 4, side, side, generator=g).to(device, dtype)
            c = torch.randn(rows, 77, config.unet.context_dim, generator=g).to(device, dtype)
            t = torch.full((rows,), 501, device=device)
            err = (ours(x, t, c) - ref(x, t, c).sample).abs().max().item()
            a = measure(lambda: ours(x, t, c), device, warmup, repeats)
            b = measure(lambda: ref(x, t, c), device, warmup, repeats)
            results[f"plain-{rows}"] = {"ours": a, "diffusers": b, "max_abs_diff": err}
            rows_out.append([f"{rows} rows, plain", f"{a['median_s'] * 1e3:.1f}", f"{b['median_s'] * 1e3:.1f}",
                             f"{b['median_s'] / a['median_s']:.2f}x", f"{a['peak_bytes'] / 2**30:.2f}", f"{b['peak_bytes'] / 2**30:.2f}", f"{err:.1e}"])
        if 4 in args.rows:
            layout = BatchLayout.cfg()
            controller = SelfReplace()
            controller.start(RunInfo(layout, 50, torch.device(device), (side, side)))
            ctx = AttnContext(0, 501, 50, layout, (controller,))
            x = torch.randn(4, 4, side, side, generator=g).to(device, dtype)
            c = torch.randn(4, 77, config.unet.context_dim, generator=g).to(device, dtype)
            t = torch.full((4,), 501, device=device)
            ref.set_attn_processor(MaterialisingProcessor())
            err = (ours(x, t, c, ctx) - ref(x, t, c).sample).abs().max().item()
            a = measure(lambda: ours(x, t, c, ctx), device, warmup, repeats)
            b = measure(lambda: ref(x, t, c), device, warmup, repeats)
            results["p2p-self-replace-4"] = {"ours": a, "diffusers_materialising": b, "max_abs_diff": err}
            rows_out.append(["4 rows, P2P self replace (ref: explicit maps)", f"{a['median_s'] * 1e3:.1f}", f"{b['median_s'] * 1e3:.1f}",
                             f"{b['median_s'] / a['median_s']:.2f}x", f"{a['peak_bytes'] / 2**30:.2f}", f"{b['peak_bytes'] / 2**30:.2f}", f"{err:.1e}"])

    name = device_name(device)
    header = ["case", "ours ms", "diffusers ms", "speed-up", "ours GiB", "diffusers GiB", "max |diff|"]
    table = f"UNet step, {args.config} at {size}x{size} px, {str(dtype).removeprefix('torch.')}, {name}\n\n" + markdown_table(header, rows_out)
    print(table)
    payload = {"device": name, "dtype": str(dtype), "config": args.config, "size": size, "torch": torch.__version__,
               "warmup": warmup, "repeats": repeats, "results": results}
    paths = write_results(args.out, f"unet-{args.config}-{size}px-{slug(name)}", payload, table)
    print("wrote", *paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
