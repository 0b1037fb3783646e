"""The zoo is the paper's: exact counts, torchvision parity, LRN formula, layer placement."""

import pytest
import torch
import torchvision
from torch import nn

from vgg_ablation.nets import design
from vgg_ablation.nets.models import (
    ARCHS,
    AlexNetLRN,
    Conv,
    build_model,
    count_params,
    transfer_from_a,
)

# The paper's Table 2 and torchvision's vgg11/13/16/19 num_params (224x224x3, 1000 classes), and the lecture's tables.
EXACT_PARAMS = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
    "lenet": 107_786,
    "alexnet": 62_378_344,
}


def meta_model(name, **kw):
    with torch.device("meta"):
        return build_model(name, **kw)


@pytest.mark.parametrize("name,expected", EXACT_PARAMS.items())
def test_exact_parameter_counts(name, expected):
    assert count_params(meta_model(name)) == expected


@pytest.mark.parametrize("name,depth", [("A", 11), ("A-LRN", 11), ("B", 13), ("C", 16), ("D", 16), ("E", 19)])
def test_depth_is_the_papers_weight_layer_count(name, depth):
    assert ARCHS[name].depth == depth


@pytest.mark.parametrize("name,tv", [("A", "vgg11"), ("B", "vgg13"), ("D", "vgg16"), ("E", "vgg19")])
@pytest.mark.parametrize("bn", [False, True])
def test_same_logits_as_torchvision(name, tv, bn):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, tv + ("_bn" if bn else ""))(weights=None).eval()
    with torch.device("meta"):  # no init of our own: every value comes from torchvision's net
        ours = build_model(name, batch_norm=bn)
    # torchvision's avgpool has no parameters, so the state dicts line up key for key.
    ours = ours.to_empty(device="cpu").eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-5)


def test_lrn_matches_the_alexnet_formula_by_hand():
    torch.manual_seed(0)
    a = torch.randn(2, 9, 4, 4) * 3
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    expected = torch.empty_like(a)
    channels = a.shape[1]
    for i in range(channels):
        lo, hi = max(0, i - n // 2), min(channels - 1, i + n // 2)
        expected[:, i] = a[:, i] / (k + alpha * (a[:, lo : hi + 1] ** 2).sum(1)) ** beta
    torch.testing.assert_close(AlexNetLRN()(a), expected)
    # The trap: torch's layer divides alpha by n; it is AlexNet's only with alpha * n passed in.
    torch.testing.assert_close(nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(a), expected)
    assert not torch.allclose(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)(a), expected)
    ours, theirs = a.clone().requires_grad_(), a.clone().requires_grad_()
    AlexNetLRN()(ours).pow(2).sum().backward()
    nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)(theirs).pow(2).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_lrn_sits_after_the_first_conv_and_relu_before_the_first_pool():
    kinds = [type(m) for m in build_model("A-LRN").features][:4]
    assert kinds == [nn.Conv2d, nn.ReLU, AlexNetLRN, nn.MaxPool2d]
    assert not any(isinstance(m, AlexNetLRN) for m in build_model("A").modules())


def conv_layout(name):
    """(block, kernel) of every conv, blocks counted by the pools before it."""
    out, block = [], 1
    for m in meta_model(name).features:
        if isinstance(m, nn.MaxPool2d):
            block += 1
        elif isinstance(m, nn.Conv2d):
            out.append((block, m.kernel_size[0], m.out_channels))
    return out


def test_c_has_its_1x1_convs_last_in_blocks_3_4_5():
    layout = conv_layout("C")
    assert [c for c in layout if c[1] == 1] == [(3, 1, 256), (4, 1, 512), (5, 1, 512)]
    for block in (3, 4, 5):
        assert [c[1] for c in layout if c[0] == block] == [3, 3, 1]
    assert all(c[1] == 3 for c in layout if c[0] <= 2)


def test_b5x5_replaces_each_pair_of_3x3_with_one_5x5():
    b, b5 = conv_layout("B"), conv_layout("B-5x5")
    assert b5 == [(block, 5, ch) for block, _, ch in b[::2]]
    assert len(b) == 2 * len(b5)


@pytest.mark.parametrize(
    "kw,message",
    [
        ({"arch": "A", "input_size": 16}, "A needs inputs of at least 32x32 (5 max-pools); got 16x16"),
        ({"arch": "alexnet", "input_size": 64}, "alexnet needs inputs of at least 67x67"),
        ({"arch": "lenet", "input_size": 3}, "lenet needs inputs of at least 4x4"),
        ({"arch": "F"}, "unknown arch 'F'; choose one of: A, A-LRN, A-LRN0, B, C, D, E, B-5x5"),
        ({"arch": "A", "width": 0}, "width must be positive"),
        ({"arch": "A", "num_classes": 0}, "num_classes must be a positive integer"),
        ({"arch": "A", "head": "big"}, "unknown head 'big'"),
    ],
)
def test_impossible_shapes_fail_at_construction_with_one_line(kw, message):
    with pytest.raises(ValueError) as err:
        meta_model(kw.pop("arch"), **kw)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_small_inputs_and_width_give_a_working_cpu_sized_net():
    model = build_model("E", num_classes=10, input_size=32, width=0.125)
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert isinstance(model.pool, nn.AdaptiveAvgPool2d)  # compact head for small images
    assert count_params(model) < count_params(meta_model("E")) / 100


@pytest.mark.parametrize("init", ["kaiming", "glorot", "paper"])
def test_inits(init):
    torch.manual_seed(0)
    model = build_model("A", num_classes=10, input_size=32, width=0.25, init=init)
    conv = model.features[0]
    assert torch.count_nonzero(conv.bias) == 0
    if init == "paper":
        assert abs(conv.weight.std().item() - 0.1) < 0.02


def test_transfer_from_a_copies_first_four_convs_and_last_three_fcs():
    kw = {"num_classes": 10, "input_size": 32, "width": 0.25}
    a, d = build_model("A", **kw), build_model("D", **kw)
    copied = transfer_from_a(d, a)
    assert len(copied) == 7
    a_convs = [m for m in a.features if isinstance(m, nn.Conv2d)]
    d_convs = [m for m in d.features if isinstance(m, nn.Conv2d)]
    # block 1 conv 1, block 2 conv 1, block 3 convs 1 and 2 of D <- A's first four convs
    for src, dst in zip(a_convs[:4], [d_convs[0], d_convs[2], d_convs[4], d_convs[5]], strict=True):
        assert torch.equal(src.weight, dst.weight)
    assert not torch.equal(a_convs[4].weight, d_convs[7].weight)  # block 4 stays random
    for src, dst in zip(a.classifier[::3], d.classifier[::3], strict=True):
        assert torch.equal(src.weight, dst.weight)


def test_design_claims_computed_from_the_definitions():
    stacks = design.stack_comparison().set_index("receptive field")
    assert stacks.loc["5x5", "stack weights / channel pair"] == 18
    assert stacks.loc["5x5", "single weights / channel pair"] == 25
    assert stacks.loc["7x7", "stack weights / channel pair"] == 27
    assert stacks.loc["7x7", "single weights / channel pair"] == 49
    assert design.receptive_field([Conv(64)] * 3) == 7
    for name in ("A", "B", "C", "D", "E"):
        assert design.halves_map_doubles_filters(name)
    assert not design.halves_map_doubles_filters("alexnet")
    assert list(design.block_pattern("A")["map"]) == [112, 56, 28, 14, 7]


def test_the_block_pattern_reads_the_pools_and_convs_it_is_given(monkeypatch):
    """A's layers with its third pool made 3x3 stride 1, or its first conv unpadded: the maps
    are followed through the layers, so the 'each block halves the map' check fails for both."""
    import dataclasses

    from vgg_ablation.nets.models import ARCHS, Pool

    features = list(ARCHS["A"].features)
    pools = [i for i, t in enumerate(features) if isinstance(t, Pool)]
    slow = features.copy()
    slow[pools[2]] = Pool(k=3, stride=1)
    unpadded = features.copy()
    unpadded[0] = Conv(unpadded[0].out, pad=0)
    monkeypatch.setitem(ARCHS, "A-slow-pool", dataclasses.replace(ARCHS["A"], features=tuple(slow)))
    monkeypatch.setitem(ARCHS, "A-unpadded", dataclasses.replace(ARCHS["A"], features=tuple(unpadded)))
    assert list(design.block_pattern("A-slow-pool")["map"]) == [112, 56, 54, 27, 13]
    assert list(design.block_pattern("A-unpadded")["map"]) == [111, 55, 27, 13, 6]
    assert not design.halves_map_doubles_filters("A-slow-pool")
    assert not design.halves_map_doubles_filters("A-unpadded")


def test_layer_table_totals_like_the_lecture():
    table = design.layer_table(build_model("lenet"), (1, 28, 28))
    convs = table[table["layer"] == "Conv2d"]
    assert list(convs["params"]) == [156, 2416]
    assert list(convs["output shape"]) == [(6, 28, 28), (16, 14, 14)]
    assert table["total"].iloc[-1] == 107_786


def test_lrn_scale_is_lrn_on_scaled_activations():
    a = torch.rand(2, 16, 5, 5)
    scaled_layer = AlexNetLRN(scale=64.0)
    torch.testing.assert_close(scaled_layer(a), AlexNetLRN()(64.0 * a) / 64.0)


def test_lrn_activity_near_1_standardised_and_clearly_above_at_the_paper_scale():
    from vgg_ablation.config import DataConfig
    from vgg_ablation.data.modules import make_datamodule
    from vgg_ablation.nets.models import lrn_activity

    torch.manual_seed(0)
    net = build_model("A-LRN", num_classes=10, input_size=32, width=0.125)
    standard = make_datamodule(DataConfig(name="sample", augment=False), seed=0)
    paper = make_datamodule(DataConfig(name="sample", augment=False, normalize="paper"), seed=0)
    for dm in (standard, paper):
        dm.setup()
    on_standard = lrn_activity(net, standard.val_dataloader(), max_images=256)
    on_paper = lrn_activity(net, paper.val_dataloader(), max_images=256)
    assert on_standard["mean"] < 1.01 and on_standard["p99"] < 1.05
    assert on_paper["mean"] > 1.15 and on_paper["p99"] > 2
    # lrn_scale at the paper's factor (255 x pixel std) brings LRN to that activity on standardised inputs
    net.features[2].scale = 255 * standard.pixel_std
    emulated = lrn_activity(net, standard.val_dataloader(), max_images=256)
    assert emulated["mean"] > 1.15
    assert (
        lrn_activity(build_model("A", num_classes=10, input_size=32, width=0.125), standard.val_dataloader())
        is None
    )
