"""The model zoo: the paper's six VGG configurations, its 5x5 control, and the lecture's baselines.

Architectures are data (torchvision's `vgg.py` style): each is a list of layer tokens built by one
function, `build_model`. References:
- VGG A, A-LRN, B, C, D, E: Simonyan & Zisserman, "Very Deep Convolutional Networks for
  Large-Scale Image Recognition", arXiv 1409.1556, Table 1.
- B-5x5: the control net of section 4.1, B with each pair of 3x3 convs replaced by one 5x5 conv.
- LeNet (28x28x1) and AlexNet (227x227x3): as the lecture tabulates them (`model.summary()`
  tables in the seed slides), 107,786 and 62,378,344 parameters.

About 500 lines, one concern read top to bottom: the layer tokens, the architecture table, the
LRN layer, `build_model`, init, A's weights into deeper nets, and the counts tests check against
the paper (parameters, FLOPs, LRN activity).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class Conv:
    """A conv + ReLU. `pad=None` means 'same' padding for stride 1 (k // 2), as in the paper."""

    out: int
    k: int = 3
    stride: int = 1
    pad: int | None = None

    @property
    def padding(self) -> int:
        return self.k // 2 if self.pad is None else self.pad


@dataclass(frozen=True)
class Pool:
    """Max-pool; the paper's is 2x2 with stride 2, AlexNet's overlapping one 3x3 with stride 2."""

    k: int = 2
    stride: int = 2


LRN = "LRN"  # AlexNet's local response normalisation (k=2, n=5, alpha=1e-4, beta=0.75)
LRN0 = "LRN0"  # the same layer with alpha = 0: no normalisation, every activation divided by k^beta
M = Pool()  # the paper's max-pool, one per block

Token = Conv | Pool | str


def vgg_layers(*blocks: Sequence[int | str | tuple[int, int]]) -> tuple[Token, ...]:
    """Table 1 shorthand: a block is a list of filter counts (3x3 convs), `(k, filters)` for a
    k x k conv (C's conv1, B-5x5's conv5), or `LRN`; each block ends with the paper's max-pool."""
    tokens: list[Token] = []
    for block in blocks:
        for item in block:
            if item in (LRN, LRN0):
                tokens.append(item)
            elif isinstance(item, tuple):
                tokens.append(Conv(out=item[1], k=item[0]))
            else:
                tokens.append(Conv(out=int(item)))
        tokens.append(M)
    return tuple(tokens)


@dataclass(frozen=True)
class Arch:
    """One network as data: feature tokens, hidden FC widths, dropout and its native input."""

    name: str
    features: tuple[Token, ...]
    fc: tuple[int, ...]
    dropout: float
    in_channels: int = 3
    input_size: int = 224
    num_classes: int = 1000
    reference: str = "Simonyan & Zisserman, arXiv 1409.1556, Table 1"
    family: str = "vgg"
    notes: str = field(default="", compare=False)

    @property
    def depth(self) -> int:
        """Weight layers, as the paper counts them (convs + FCs)."""
        return sum(isinstance(t, Conv) for t in self.features) + len(self.fc) + 1


def _vgg(name: str, *blocks: Sequence, notes: str = "") -> Arch:
    return Arch(name, vgg_layers(*blocks), fc=(4096, 4096), dropout=0.5, notes=notes)


C1 = 1  # kernel size of C's 1x1 convs
ARCHS: dict[str, Arch] = {
    a.name: a
    for a in (
        _vgg("A", [64], [128], [256, 256], [512, 512], [512, 512]),
        _vgg("A-LRN", [64, LRN], [128], [256, 256], [512, 512], [512, 512]),
        _vgg(
            "A-LRN0",
            [64, LRN0],
            [128],
            [256, 256],
            [512, 512],
            [512, 512],
            notes="control for LRN: its layer with alpha = 0, a constant division by k^beta = 2^0.75 = 1.68 "
            "(Krizhevsky et al. 2012's constants): its rescaling without its normalisation",
        ),  # fmt: skip
        _vgg("B", [64, 64], [128, 128], [256, 256], [512, 512], [512, 512]),
        _vgg(
            "C",
            [64, 64],
            [128, 128],
            [256, 256, (C1, 256)],
            [512, 512, (C1, 512)],
            [512, 512, (C1, 512)],
        ),
        _vgg("D", [64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3),
        _vgg("E", [64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4),
        _vgg(
            "B-5x5",
            [(5, 64)],
            [(5, 128)],
            [(5, 256)],
            [(5, 512)],
            [(5, 512)],
            notes="section 4.1 control: B with each pair of 3x3 convs replaced by one 5x5 conv",
        ),
        Arch(
            "lenet",
            (Conv(6, k=5), Pool(2, 2), Conv(16, k=5), Pool(2, 2)),
            fc=(120, 84),
            dropout=0.0,
            in_channels=1,
            input_size=28,
            num_classes=10,
            reference="LeCun et al. 1998, as tabulated in the lecture (28x28x1, 'same' padding)",
            family="lenet",
        ),
        Arch(
            "alexnet",
            (
                Conv(96, k=11, stride=4, pad=0),
                Pool(3, 2),
                Conv(256, k=5),
                Pool(3, 2),
                Conv(384),
                Conv(384),
                Conv(256),
                Pool(3, 2),
            ),
            fc=(4096, 4096),
            dropout=0.4,  # the lecture's Keras code uses 0.4 (the 2012 paper used 0.5)
            input_size=227,
            reference="Krizhevsky et al. 2012, as tabulated in the lecture (227x227x3)",
            family="alexnet",
        ),
    )
}
PAPER_STEPS = ("A", "A-LRN", "B", "C", "D", "E")  # the paper's six steps, in its order


class AlexNetLRN(nn.Module):
    """LRN exactly as AlexNet defines it: b_i = a_i / (k + alpha * sum_{|j-i| <= n/2} a_j^2) ** beta.

    Written out rather than `torch.nn.LocalResponseNorm`, which divides alpha by n (a trap: it
    equals this layer only with alpha * n passed in) and, on CPU, spends twice as long
    in its avg_pool3d window sum as this 1x1 conv with a band matrix (measured: 53 vs 24 ms per
    forward + backward at 128x16x32x32 on 2 cores).

    `scale` makes the layer act on activations `scale` times larger than it is given, and return
    its output in the given units: LRN(scale * a) / scale, i.e. alpha multiplied by scale**2. The
    constants were set for the activations that 0-255 inputs give; a net fed standardised inputs
    (or with batch norm before the LRN) has activations about 255 x pixel-std (~64) times smaller,
    where the denominator is 1.0001 and the layer does nothing. With scale = that factor the layer
    normalises as it would at the paper's scale (exact for a conv-ReLU-LRN stem: conv and ReLU
    are positively homogeneous), while the rest of the net trains at the scale its init suits.
    """

    def __init__(
        self, n: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0, scale: float = 1.0
    ):
        super().__init__()
        self.n, self.alpha, self.beta, self.k, self.scale = n, alpha, beta, k, float(scale)

    def denominator(self, a: torch.Tensor) -> torch.Tensor:
        """k + alpha * scale^2 * (sum of squares over each channel's window)."""
        channels, reach = a.shape[1], self.n // 2
        # band[i, j] = 1 where channel j is in channel i's window (|i - j| <= n // 2)
        band = torch.ones(channels, channels, dtype=a.dtype, device=a.device).triu(-reach).tril(reach)
        window = nn.functional.conv2d(a * a, band[:, :, None, None])
        return self.k + (self.alpha * self.scale**2) * window

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # In fp32 whatever autocast says, then back to the input's dtype: in bf16 the step at
        # k = 2 is 0.0156, so an alpha * window below ~0.008 would round away and the layer would
        # differ from the CPU's fp32 one.
        device = a.device.type
        autocast_on = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False) if autocast_on else contextlib.nullcontext():
            a32 = a.float()
            # d ** -beta as exp(-beta * log d) (d >= k > 0): the same to 1 ulp, and on CPU a
            # non-integer pow runs 3.5x slower than exp and log (measured: 23.7 vs 6.8 ms at
            # 128x8x32x32, 1 thread); it was 17% of A-LRN's training step at width 1/8.
            return (a32 * torch.exp(torch.log(self.denominator(a32)) * -self.beta)).to(a.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, alpha={self.alpha}, beta={self.beta}, k={self.k}, scale={self.scale:g}"


@torch.no_grad()
def lrn_activity(model: nn.Module, batches, max_images: int = 1024) -> dict[str, float] | None:
    """How much the model's LRN layers did on these images: the mean and 99th percentile of
    their denominator over k (1.0 = LRN passes activations through unchanged). None without LRN."""
    layers = [m for m in model.modules() if isinstance(m, AlexNetLRN)]
    if not layers:
        return None
    seen: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(
            lambda m, inp, out: seen.append((m.denominator(inp[0]) / m.k).flatten().float().cpu())
        )
        for m in layers
    ]
    was_training = model.training
    model.eval()
    try:
        n = 0
        # eager even when compiled: a compiled graph skips hooks added after it was traced
        with torch.compiler.set_stance("force_eager"):
            for x, y in batches:
                if (y < 0).any():  # evaluation's padded last batch: skipped whole, so that
                    continue  # its blank padding images count nowhere
                model(x.to(next(model.parameters()).device))
                n += len(x)
                if n >= max_images:
                    break
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    values = torch.cat(seen)
    step = max(1, values.numel() // 4_000_000)  # quantile() has a size limit; a strided subset is plenty
    return {"mean": float(values.mean()), "p99": float(values[::step].quantile(0.99))}


class Net(nn.Module):
    """features -> (flatten | global average pool) -> classifier, like torchvision's VGG. It
    keeps the Arch it was built from and the head actually built (what a run records)."""

    def __init__(
        self,
        features: nn.Sequential,
        pool: nn.Module,
        classifier: nn.Sequential,
        arch: Arch | None = None,
        head: str = "",
    ):
        super().__init__()
        self.features = features
        self.pool = pool
        self.classifier = classifier
        self.arch, self.head = arch, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def feature_map_sizes(features: Sequence[Token], input_size: int) -> list[int]:
    """Spatial size after each token; raises ValueError if any layer gets an empty map."""
    sizes, n = [], input_size
    for token in features:
        if isinstance(token, Conv):
            n = (n + 2 * token.padding - token.k) // token.stride + 1
        elif isinstance(token, Pool):
            n = (n - token.k) // token.stride + 1
        if n < 1:
            raise ValueError("empty feature map")
        sizes.append(n)
    return sizes


def min_input_size(arch: Arch) -> int:
    """The smallest square input every layer of `arch` accepts."""
    for n in range(1, 4096):
        try:
            feature_map_sizes(arch.features, n)
            return n
        except ValueError:
            continue
    raise AssertionError(f"{arch.name}: no input size up to 4096 fits")


def get_arch(name: str) -> Arch:
    if name not in ARCHS:
        raise ValueError(f"unknown arch {name!r}; choose one of: {', '.join(ARCHS)}")
    return ARCHS[name]


def resolve_head(arch: Arch, head: str, input_size: int) -> str:
    """'auto' keeps the paper's flatten + FC head at the native input size (and for LeNet and
    AlexNet always), and takes the compact head for small images, where the paper's 4096-wide
    layers would hold most of the parameters and most of the CPU time."""
    if head not in ("auto", "paper", "compact"):
        raise ValueError(f"unknown head {head!r}; choose one of: auto, paper, compact")
    if head != "auto":
        return head
    return "paper" if arch.family != "vgg" or input_size >= arch.input_size else "compact"


def build_model(
    arch: str | Arch,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: int | None = None,
    width: float = 1.0,
    batch_norm: bool = False,
    head: str = "auto",
    dropout: float | None = None,
    init: str = "kaiming",
    lrn_scale: float = 1.0,
) -> Net:
    """Build one network of the zoo.

    width scales every conv and hidden FC (1/4 or 1/8 for CPU-sized studies); batch_norm adds
    BatchNorm after each conv (the modern variant); head is 'paper' (flatten, FC-4096, FC-4096,
    FC-classes, dropout on the first two), 'compact' (global average pool, then three FCs as wide
    as the last conv) or 'auto'. init is 'kaiming' (torchvision's), 'glorot' or 'paper'
    (N(0, 1e-2 variance), biases 0); transfer from a trained A is `transfer_from_a`.
    """
    spec = get_arch(arch) if isinstance(arch, str) else arch
    num_classes = spec.num_classes if num_classes is None else num_classes
    in_channels = spec.in_channels if in_channels is None else in_channels
    input_size = spec.input_size if input_size is None else input_size
    dropout = spec.dropout if dropout is None else dropout
    sizes = _check_shape(spec, num_classes, in_channels, input_size, width, dropout)
    layers: list[nn.Module] = []
    channels = in_channels
    for token in spec.features:
        if isinstance(token, Conv):
            out = scaled(token.out, width)
            layers.append(nn.Conv2d(channels, out, token.k, token.stride, token.padding))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        elif isinstance(token, Pool):
            layers.append(nn.MaxPool2d(token.k, token.stride))
        elif token == LRN:
            layers.append(AlexNetLRN(scale=lrn_scale))
        elif token == LRN0:
            layers.append(AlexNetLRN(alpha=0.0, scale=lrn_scale))
        else:  # pragma: no cover - the table above is the only source of tokens
            raise AssertionError(f"unknown token {token!r}")

    head = resolve_head(spec, head, input_size)
    pool, classifier = _head(spec, head, channels, sizes[-1], width, dropout, num_classes)
    model = Net(nn.Sequential(*layers), pool, classifier, spec, head)
    initialise(model, init)
    return model


def _check_shape(spec: Arch, num_classes: int, in_channels: int, input_size: int, width: float,
                 dropout: float) -> list[int]:  # fmt: skip
    """The feature map sizes, or a ValueError saying what does not fit."""
    for label, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if value < 1:
            raise ValueError(f"{label} must be a positive integer, got {value}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    try:
        return feature_map_sizes(spec.features, input_size)
    except ValueError:
        need = min_input_size(spec)
        raise ValueError(
            f"{spec.name} needs inputs of at least {need}x{need} "
            f"({sum(isinstance(t, Pool) for t in spec.features)} max-pools); "
            f"got {input_size}x{input_size}"
        ) from None


def _head(spec: Arch, head: str, channels: int, side: int, width: float, dropout: float, num_classes: int):
    """The pool before the classifier and the classifier: the paper's flatten + FC-4096 x2 (scaled
    by width), or the compact head (global average pool, FCs as wide as the last conv)."""
    if head == "paper":
        pool: nn.Module = nn.Identity()
        flat = channels * side**2
        hidden = [scaled(h, width) for h in spec.fc]
    else:
        pool = nn.AdaptiveAvgPool2d(1)
        flat = channels
        hidden = [channels] * len(spec.fc)
    fc: list[nn.Module] = []
    for h in hidden:
        fc += [nn.Linear(flat, h), nn.ReLU(inplace=True)]
        if dropout > 0:
            fc.append(nn.Dropout(dropout))
        flat = h
    fc.append(nn.Linear(flat, num_classes))
    return pool, nn.Sequential(*fc)


INITS = ("kaiming", "glorot", "paper")


def initialise(model: nn.Module, scheme: str) -> None:
    """Weight init. kaiming: He init (convs as torchvision, fan_out; FCs fan_in); glorot: Xavier-uniform, the init the
    authors later found removes the need for A-pretraining; paper: N(0, 0.01 variance), biases 0."""
    if scheme not in INITS:
        raise ValueError(f"unknown init {scheme!r}; choose one of: {', '.join(INITS)}, from_A")
    if any(p.is_meta for p in model.parameters()):
        # Shapes only (a study's check, the same-logits tests): there is nothing to draw, and a
        # draw on the meta device goes through torch._refs, which imports torch._dynamo (1.2 CPU-s).
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear):
            if scheme == "glorot":
                nn.init.xavier_uniform_(m.weight)
            elif scheme == "paper":
                nn.init.normal_(m.weight, 0.0, 0.1)  # variance 1e-2
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            else:
                # He init for the FCs too (torchvision draws them from N(0, 0.01), which shrinks
                # the signal ~10x per layer through a narrow head and stalls small nets).
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _conv_positions(features: nn.Sequential) -> list[tuple[int, int, nn.Conv2d, nn.Module | None]]:
    """(block, index in block, conv, its BatchNorm or None) for every conv, blocks split by pools."""
    out, block, index = [], 0, 0
    modules = list(features)
    for i, m in enumerate(modules):
        if isinstance(m, nn.MaxPool2d):
            block, index = block + 1, 0
        elif isinstance(m, nn.Conv2d):
            bn = modules[i + 1] if isinstance(modules[i + 1], nn.BatchNorm2d) else None
            out.append((block, index, m, bn))
            index += 1
    return out


def transfer_from_a(model: Net, trained_a: Net) -> list[str]:
    """Section 3.1: start a deeper net from a trained A: A's first four conv layers and its last
    three FC layers are copied, the other layers keep their random init.

    A's first four convs are the first conv of blocks 1, 2 and 3 and the second of block 3; each is
    copied into the conv at the same place (block, position) of the deeper net, where the shapes
    agree (they do for A-LRN, B, C, D, E; B-5x5's 5x5 convs have no 3x3 counterpart and stay
    random). Returns the names of the layers copied.
    """
    copied = []
    targets = {(b, i): (conv, bn) for b, i, conv, bn in _conv_positions(model.features)}
    names = {id(m): n for n, m in model.named_modules()}
    with torch.no_grad():
        for block, index, conv, bn in _conv_positions(trained_a.features)[:4]:
            target = targets.get((block, index))
            if target is None or target[0].weight.shape != conv.weight.shape:
                continue
            for dst, src in ((target[0], conv), (target[1], bn)):
                if dst is not None and src is not None:
                    dst.load_state_dict(src.state_dict())
            copied.append(names[id(target[0])])
        src_fc = [m for m in trained_a.classifier if isinstance(m, nn.Linear)][-3:]
        dst_fc = [m for m in model.classifier if isinstance(m, nn.Linear)][-3:]
        for dst, src in zip(dst_fc, src_fc, strict=True):
            if dst.weight.shape == src.weight.shape:
                dst.load_state_dict(src.state_dict())
                copied.append(names[id(dst)])
    return copied


def forward_flops(model, input_size: int) -> int:
    """FLOPs (2 x multiply-adds) of one image's forward pass, counted by torch (works on the meta
    device too: a net built there costs nothing)."""
    from torch.utils.flop_counter import FlopCounterMode

    param = next(model.parameters())
    was_training = model.training
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return int(counter.get_total_flops())


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
