"""Contract tests over the model zoo and the multi-header students (tiny CPU inputs)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from cdfkd.models import (
    FeatureOutput,
    StagedClassifier,
    count_macs,
    count_params,
    create_model,
    create_student,
    list_models,
    student_structure_space,
)

C = 10  # classes


def _size(name: str) -> int:
    """The smallest-cost input side each family is tested at."""
    return 64 if name.endswith("_imagenet") else 32


def _convs_without_bn(model: nn.Module) -> list[str]:
    """Convolutions whose output reaches another conv, a linear layer or the output before a BN."""
    gm = fx.symbolic_trace(model, concrete_args={"return_features": False})
    modules = dict(gm.named_modules())

    def kind(node: fx.Node) -> str:
        if node.op == "output":
            return "end"
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                return "bn"
            if isinstance(m, nn.Conv2d):
                return "conv"
            if isinstance(m, nn.Linear):
                return "end"
        return "other"

    bad = []
    for node in gm.graph.nodes:
        if kind(node) != "conv":
            continue
        frontier, seen = list(node.users), set()
        while frontier:
            n = frontier.pop()
            if n in seen or kind(n) == "bn":
                continue
            seen.add(n)
            if kind(n) in ("conv", "end"):
                bad.append(str(node.target))
                break
            frontier.extend(n.users)
    return bad


# ---------------------------------------------------------------- zoo contract


def test_registry_lists_the_zoo():
    assert set(list_models()) == {
        "lenet5",
        "lenet5_half",
        "resnet18",
        "resnet34",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_40_1",
        "wrn_40_2",
        "resnet18_imagenet",
        "resnet34_imagenet",
    }


EXPECTED_STAGES = {
    # name: [(channels, side)] per stage at the tested input size
    "lenet5": [(6, 14), (16, 5), (120, 1)],
    "lenet5_half": [(3, 14), (8, 5), (60, 1)],
    "resnet18": [(64, 32), (64, 32), (128, 16), (256, 8), (512, 4)],
    "resnet34": [(64, 32), (64, 32), (128, 16), (256, 8), (512, 4)],
    "wrn_16_1": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "wrn_16_2": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "wrn_40_1": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "wrn_40_2": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "resnet18_imagenet": [(64, 16), (64, 16), (128, 8), (256, 4), (512, 2)],
    "resnet34_imagenet": [(64, 16), (64, 16), (128, 8), (256, 4), (512, 2)],
}


@pytest.mark.parametrize("name", list_models())
def test_zoo_model_contract(name):
    s = _size(name)
    in_ch = 1 if name.startswith("lenet") else 3
    model = create_model(name, C, in_ch, s)
    assert isinstance(model, StagedClassifier)
    x = torch.randn(2, in_ch, s, s)
    assert model(x).shape == (2, C)
    out = model(x, return_features=True)
    assert isinstance(out, FeatureOutput)
    assert out.logits.shape == (2, C)
    assert [(m.shape[1], m.shape[2]) for m in out.stages] == EXPECTED_STAGES[name]
    assert all(m.shape[0] == 2 and m.shape[2] == m.shape[3] for m in out.stages)
    assert out.embedding.shape == (2, model.feature_dim)
    assert len(model.bn_layers()) > 0
    assert _convs_without_bn(model) == []


def test_lenet5_params_and_macs_match_hand_count():
    def conv_bn(c_in, c_out):  # 5x5 bias-free conv + BN (weight, bias)
        return c_in * c_out * 25 + 2 * c_out

    params = conv_bn(1, 6) + conv_bn(6, 16) + conv_bn(16, 120) + (120 * 84 + 84) + (84 * C + C)
    assert params == 61_848
    model = create_model("lenet5", C, 1, 32)
    assert count_params(model) == params
    macs = 28 * 28 * 6 * 25 + 10 * 10 * 16 * 6 * 25 + 120 * 16 * 25 + 120 * 84 + 84 * C
    assert count_macs(model, (1, 1, 32, 32)) == macs == 416_520
    half = create_model("lenet5_half", C, 1, 32)
    assert count_params(half) == (
        conv_bn(1, 3) + conv_bn(3, 8) + conv_bn(8, 60) + (60 * 42 + 42) + (42 * C + C)
    )


def test_profile_restores_modes():
    model = create_model("lenet5", C, 1, 32)
    model.train()
    model.stages["conv1"].eval()  # a frozen part must stay frozen
    prof = {"params": count_params(model), "macs": count_macs(model, (1, 1, 32, 32))}
    assert set(prof) == {"params", "macs"} and prof["macs"] > 0
    assert model.training and model.stages["conv2"].training
    assert not model.stages["conv1"].training


@pytest.mark.parametrize(
    ("name", "size", "valid"),
    [
        ("lenet5", 28, "32..64"),
        ("resnet18", 8, "16..64"),
        ("wrn_16_1", 128, "16..64"),
        ("resnet18_imagenet", 32, "64..224"),
    ],
)
def test_zoo_refuses_bad_inputs(name, size, valid):
    with pytest.raises(ValueError, match=f"image_size={size}.*valid: {valid}"):
        create_model(name, C, 3, size)
    with pytest.raises(ValueError, match="in_channels"):
        create_model(name, C, 0, int(valid.split("..")[0]))


def test_unknown_model_lists_known_names():
    with pytest.raises(KeyError, match="lenet5.*resnet18"):
        create_model("resnet19", C)


# ---------------------------------------------------------------- multi-header students


def _values(backbone: str, family: str) -> list[int]:
    key = "fuse_from" if family == "mfs" else "share_until"
    lo, hi = student_structure_space(backbone)[family][key]
    return list(range(lo, hi + 1))


def _check_student(backbone, family, headers, value, width, size, in_ch=3):
    key = "fuse_from" if family == "mfs" else "share_until"
    model = create_student(
        backbone, C, in_ch, size, family=family, headers=headers, header_width=width, **{key: value}
    )
    assert model.num_headers == headers
    x = torch.randn(2, in_ch, size, size)
    out = model(x, return_features=True)
    assert out.logits.shape == (headers, 2, C)
    assert len(out.stages) == len(out.embedding) == headers
    num_stages = len(student_structure_space(backbone)["stages"])
    expected_maps = num_stages - value if family == "mfs" else num_stages
    for maps, emb in zip(out.stages, out.embedding, strict=True):
        assert len(maps) == expected_maps and all(m.shape[0] == 2 for m in maps)
        assert emb.shape == (2, model.feature_dim)
    assert len(model.bn_layers()) > 0

    # one backward: the shared body and every header get gradient
    target = torch.randint(0, C, (2,))
    loss = sum(F.cross_entropy(logits, target) for logits in out.logits)
    loss.backward()
    body = model.trunk if family == "mfs" else model.shared
    first = next(body.parameters())
    assert first.grad is not None and first.grad.abs().sum() > 0
    for head in model.heads:
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None for g in grads)
        assert all(g.abs().sum() > 0 for g in grads if g.dim() > 1)  # conv / linear weights
    return model


GRID = [
    (backbone, family, headers, value, width)
    for backbone in ("lenet5", "resnet18")
    for family in ("mfs", "branch")
    for headers in (1, 3)
    for value in _values(backbone, family)
    for width in (0.5, 1.25)
]


@pytest.mark.parametrize(("backbone", "family", "headers", "value", "width"), GRID)
def test_student_grid(backbone, family, headers, value, width):
    size, in_ch = (32, 1) if backbone == "lenet5" else (16, 3)
    _check_student(backbone, family, headers, value, width, size, in_ch)


@pytest.mark.parametrize("family", ["mfs", "branch"])
def test_student_params_grow_with_headers_and_width(family):
    def n(headers, width):
        return count_params(
            create_student("lenet5", C, 1, 32, family=family, headers=headers, header_width=width)
        )

    assert n(1, 1.0) < n(3, 1.0)
    assert n(3, 0.5) < n(3, 1.0) < n(3, 2.0)


def test_student_defaults_and_plain():
    plain = create_student("lenet5", C, 1, 32)
    assert isinstance(plain, StagedClassifier)
    assert create_student("resnet18", C, 3, 16, family="mfs", headers=2).fuse_from == 1
    branch = create_student("lenet5", C, 1, 32, family="branch", headers=2)
    assert list(branch.shared) == ["conv1", "conv2"]  # all but the last stage shared


def test_mfs_matches_reference_widths():
    """mhresnet8x18: encoders 64->128, 256->256, 512->512, 1024->512 (header 512-d)."""
    model = create_student("resnet18", C, 3, 16, family="mfs", headers=1)
    enc = model.heads[0].encoders
    assert [(e[0].in_channels, e[-3].out_channels) for e in enc] == [
        (64, 128),
        (256, 256),
        (512, 512),
        (1024, 512),
    ]
    assert model.feature_dim == 512


def test_structure_space():
    assert student_structure_space("resnet18") == {
        "stages": ["stem", "layer1", "layer2", "layer3", "layer4"],
        "mfs": {"fuse_from": (1, 4)},
        "branch": {"share_until": (1, 4)},
        "header_width": (0.0, 4.0),
    }
    assert student_structure_space("lenet5")["mfs"]["fuse_from"] == (0, 2)
    assert student_structure_space("lenet5")["branch"]["share_until"] == (1, 2)
    assert student_structure_space("wrn_40_2")["mfs"]["fuse_from"] == (1, 3)
    assert student_structure_space("resnet34_imagenet")["branch"]["share_until"] == (1, 4)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (
            {"family": "mfs", "fuse_from": 5},
            r"fuse_from=5 is out of range for resnet18 \(valid: 1\.\.4\)",
        ),
        ({"family": "mfs", "fuse_from": 0}, r"fuse_from=0 .*valid: 1\.\.4"),
        ({"family": "branch", "share_until": 0}, r"share_until=0 .*valid: 1\.\.4"),
        ({"family": "branch", "share_until": 5}, r"share_until=5 .*valid: 1\.\.4"),
        ({"family": "mfs", "header_width": 0.0}, r"header_width=0\.0 .*valid: \(0, 4\.0\]"),
        ({"family": "branch", "header_width": 4.5}, r"header_width=4\.5 .*valid"),
        ({"family": "mfs", "headers": 0}, r"headers=0"),
        ({"family": "mtan"}, r"valid: mfs, branch"),
        ({"family": "mfs", "share_until": 2}, r"share_until applies to family='branch'"),
        ({"family": "branch", "fuse_from": 2}, r"fuse_from applies to family='mfs'"),
        ({"headers": 3}, r"need family"),
    ],
)
def test_student_refusals(kw, match):
    with pytest.raises(ValueError, match=match):
        create_student("resnet18", C, 3, 32, **kw)


def test_student_refusal_lenet_range():
    with pytest.raises(ValueError, match=r"fuse_from=3 is out of range for lenet5 \(valid: 0\.\.2"):
        create_student("lenet5", C, 1, 32, family="mfs", fuse_from=3)
    with pytest.raises(ValueError, match=r"share_until=3 .*lenet5 \(valid: 1\.\.2\)"):
        create_student("lenet5", C, 1, 32, family="branch", share_until=3)


def test_mfs_student_trains():
    model = create_student("lenet5_half", C, 1, 32, family="mfs", headers=3)
    x, y = torch.randn(16, 1, 32, 32), torch.randint(0, C, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def loss_fn():
        logits = model(x)
        return torch.stack([F.cross_entropy(h, y) for h in logits]).mean()

    first = loss_fn().item()
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


@pytest.mark.slow
@pytest.mark.parametrize("backbone", list_models())
def test_every_structure_on_every_backbone(backbone):
    """Every family x every valid fuse_from / share_until builds and back-propagates (H=2)."""
    size = 64 if backbone.endswith("_imagenet") else (32 if backbone.startswith("lenet") else 16)
    widths = (0.25, 1.25)
    for family in ("mfs", "branch"):
        for i, value in enumerate(_values(backbone, family)):
            _check_student(backbone, family, 2, value, widths[i % 2], size)
