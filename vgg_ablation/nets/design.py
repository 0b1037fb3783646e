"""What the designs say before any training: computed from the model definitions, not typed in.

- receptive field and weights per channel pair of a stack of convs (paper section 2.3: two 3x3
  see 5x5 with 18 weights instead of 25, three see 7x7 with 27 instead of 49);
- the "halve the map, double the filters" pattern of the blocks;
- a per-layer summary table like the lecture's `model.summary()`.
"""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from vgg_ablation.nets.models import ARCHS, Arch, Conv, Pool


def blocks(arch: Arch) -> list[list[Conv]]:
    """The convs of each block (blocks end at a pool)."""
    out: list[list[Conv]] = [[]]
    for token in arch.features:
        if isinstance(token, Conv):
            out[-1].append(token)
        elif isinstance(token, Pool):
            out.append([])
    return [b for b in out if b]


def receptive_field(convs: list[Conv]) -> int:
    """Receptive field of a stack of convs: 1 + sum (k - 1) * (product of earlier strides)."""
    field, jump = 1, 1
    for conv in convs:
        field += (conv.k - 1) * jump
        jump *= conv.stride
    return field


def weights_per_channel_pair(convs: list[Conv]) -> int:
    """Weights a stack needs per (input channel, output channel) pair, all layers C channels wide."""
    return sum(conv.k**2 for conv in convs)


def stack_comparison() -> pd.DataFrame:
    """Stacks of 3x3 convs taken from the zoo against the single conv with the same field.

    Two 3x3 convs: block 1 of B vs block 1 of B-5x5 (the paper's control). Three: block 3 of D vs
    a single 7x7, the comparison the paper makes in section 2.3.
    """
    rows = []
    for n_convs, arch_name, block in ((2, "B", 0), (3, "D", 2)):
        stack = blocks(ARCHS[arch_name])[block]
        assert len(stack) == n_convs and all(c.k == 3 for c in stack)
        field = receptive_field(stack)
        single = Conv(stack[0].out, k=field)
        if n_convs == 2:  # the zoo's own 5x5 control
            single = blocks(ARCHS["B-5x5"])[block][0]
        rows.append(
            {
                "stack": f"{n_convs} x 3x3 ({arch_name} block {block + 1})",
                "receptive field": f"{field}x{field}",
                "single conv": f"1 x {single.k}x{single.k}",
                "single receptive field": f"{receptive_field([single])}x{single.k}",
                "stack weights / channel pair": weights_per_channel_pair(stack),
                "single weights / channel pair": weights_per_channel_pair([single]),
                "weights saved": 1 - weights_per_channel_pair(stack) / single.k**2,
                "non-linearities": f"{n_convs} vs 1",
            }
        )
    return pd.DataFrame(rows)


def block_pattern(arch_name: str, input_size: int = 224) -> pd.DataFrame:
    """Per block: output map size and filter count, with the ratio to the previous block. The map
    is followed through every conv and pool the architecture lists (their kernels, strides and
    paddings), so a block whose pool does not halve shows it."""
    arch = ARCHS[arch_name]
    size, rows, convs = input_size, [], []
    for token in arch.features:
        if isinstance(token, Conv):
            size = (size + 2 * token.padding - token.k) // token.stride + 1
            convs.append(token)
        elif isinstance(token, Pool):
            size = (size - token.k) // token.stride + 1
            if convs:
                rows.append(
                    {"block": len(rows) + 1, "convs": len(convs), "map": size, "filters": convs[-1].out}
                )
            convs = []
    df = pd.DataFrame(rows)
    df["map ratio"] = df["map"] / df["map"].shift()
    df["filter ratio"] = df["filters"] / df["filters"].shift()
    return df


def halves_map_doubles_filters(arch_name: str) -> bool:
    """Each block halves the map; filters double until they reach 512, then stay."""
    df = block_pattern(arch_name).iloc[1:]
    capped = df["filters"].shift().fillna(0) >= 512
    return bool(
        (df["map ratio"] == 0.5).all()
        and ((df["filter ratio"] == 2) | (capped & (df["filter ratio"] == 1))).all()
    )


def layer_table(model: nn.Module, input_shape: tuple[int, int, int]) -> pd.DataFrame:
    """One row per leaf layer: name, output shape, parameters, running total.

    Written here rather than with torchinfo: it is a dozen lines with forward hooks, runs on the
    meta device (no memory, no compute, instant even for E at 224) and yields a DataFrame that the
    CLI and reports print.
    """
    rows: list[dict] = []

    def hook(module: nn.Module, _inputs, output) -> None:
        rows.append(
            {
                "layer": type(module).__name__,
                "output shape": tuple(output.shape[1:]),
                "params": sum(p.numel() for p in module.parameters(recurse=False)),
            }
        )

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model = model.to("meta")
        with torch.no_grad():
            model(torch.empty(1, *input_shape, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    df = pd.DataFrame(rows)
    df["total"] = df["params"].cumsum()
    return df


def run_summary(args: list[str]) -> int:
    """`vgg-ablation summary`: one net's layers, output shapes and parameters, built on the meta
    device (no memory, no time), with the paper's total to check against."""
    import torch

    from vgg_ablation.config import SummaryOptions, options
    from vgg_ablation.errors import UserError
    from vgg_ablation.nets.models import build_model, get_arch

    opts = options(SummaryOptions, args, "summary")
    try:
        arch = get_arch(opts.arch)
        size = opts.input_size or arch.input_size
        with torch.device("meta"):
            model = build_model(arch, num_classes=opts.num_classes, input_size=size, width=opts.width,
                                batch_norm=opts.batch_norm, head=opts.head)  # fmt: skip
    except ValueError as exc:
        raise UserError(str(exc)) from None
    table = layer_table(model, (arch.in_channels, size, size))
    table["output shape"] = table["output shape"].map(lambda s: "(None, " + ", ".join(map(str, s)) + ")")
    shown = table.assign(params=table["params"].map("{:,}".format), total=table["total"].map("{:,}".format))
    print(f"{arch.name}: {arch.reference}; {arch.depth} weight layers")
    print(shown.to_markdown(index=False, colalign=("left", "left", "right", "right")))
    print(f"Total params: {int(table['params'].sum()):,}")
    return 0
