"""torchvision models (``torchvision:<name>``) behind the zoo's interface: the contract every
method relies on, the automatic stage rule, ensembles, multi-header students, refusals."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdfkd.bn_hooks import BNStatsRecorder, batchnorm_layers
from cdfkd.data import DatasetInfo
from cdfkd.models import (
    FeatureOutput,
    ModelCheckError,
    WrappedClassifier,
    create_model,
    create_student,
    list_torchvision_models,
    student_structure_space,
)
from cdfkd.models.taps import as_map
from cdfkd.teachers import TeacherEnsemble, ensemble_from_numpy, ensemble_to_numpy, load_ensemble
from cdfkd.teachers import save_ensemble as save

C = 10
INFO = DatasetInfo("digits", C, 1, 32, (0.3,), (0.3,))

#: measured stage choices of the automatic rule at 1x32x32 (cdfkd.models.tracing)
STAGES = {
    "resnet18": (["layer1", "layer2", "layer3", "layer4"], [64, 128, 256, 512], 512),
    "mobilenet_v3_small": (
        ["features.1", "features.3", "features.8", "features"],
        [16, 24, 48, 576],
        1024,
    ),
    "squeezenet1_1": (
        ["features.1", "features.4", "features.7", "features"],
        [64, 128, 256, 512],
        512,
    ),
    "shufflenet_v2_x0_5": (["maxpool", "stage2", "stage3", "conv5"], [24, 48, 96, 1024], 1024),
}


def _x(batch: int = 2, channels: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, 32, 32)


def test_the_list_is_torchvisions_classification_models():
    names = list_torchvision_models()
    assert {"resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_b_16"} <= set(names)
    assert "fasterrcnn_resnet50_fpn" not in names  # detection models are not classifiers


@pytest.mark.parametrize("name", sorted(STAGES))
def test_torchvision_model_contract(name):
    stages, channels, dim = STAGES[name]
    model = create_model(f"torchvision:{name}", C, 1, 32)
    assert isinstance(model, WrappedClassifier)
    assert model.stage_names == stages and model.feature_dim == dim
    x = _x()
    model.eval()
    plain = model(x)
    out = model(x, return_features=True)
    assert isinstance(out, FeatureOutput) and plain.shape == (2, C)
    torch.testing.assert_close(out.logits, plain, rtol=0, atol=0)  # the same forward
    assert [m.shape[1] for m in out.stages] == channels
    sides = [m.shape[2] for m in out.stages]
    assert all(m.dim() == 4 and m.shape[2] == m.shape[3] for m in out.stages)
    assert sides == sorted(sides, reverse=True)
    assert out.embedding.shape == (2, dim)
    assert (len(model.bn_layers()) == 0) == (name == "squeezenet1_1")  # SqueezeNet has none
    assert all(bn.momentum == 0.1 for _, bn in model.bn_layers())  # not torchvision's 0.01
    # adapted to one channel at the first convolution the forward calls
    assert next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels == 1


def test_features_follow_the_training_forward():
    """Stage maps are read during the model's own forward: gradients reach them, BN statistics
    move once per forward, and no hook is left behind."""
    model = create_model("torchvision:resnet18", C, 1, 32).train()
    bn = model.model.bn1
    before = bn.num_batches_tracked.item()
    out = model(_x(4), return_features=True)
    assert bn.num_batches_tracked.item() == before + 1
    (out.logits.sum() + sum(m.mean() for m in out.stages) + out.embedding.mean()).backward()
    assert model.model.conv1.weight.grad is not None
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_copy_state_dict_and_assign_keep_features_right(roundtrip):
    a = create_model("torchvision:mobilenet_v3_small", C, 1, 32).eval()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.model.classifier[-1].bias.add_(1.0)
    x = _x()
    assert torch.allclose(b(x, return_features=True).logits, b(x))
    assert not torch.allclose(a(x), b(x))
    assert list(a.state_dict())[0].startswith("model.")  # torchvision's keys under model.
    c = create_model("torchvision:mobilenet_v3_small", C, 1, 32).eval()
    c.load_state_dict(roundtrip(b.state_dict()), assign=True)
    torch.testing.assert_close(c(x, return_features=True).logits, b(x))


def test_explicit_stages_and_their_refusals():
    model = create_model("torchvision:resnet18", C, 1, 32, stages=["layer3", "layer4"])
    assert [m.shape[1:] for m in model(_x(), return_features=True).stages] == [
        (256, 2, 2),
        (512, 1, 1),
    ]
    with pytest.raises(
        ModelCheckError, match=r"\['layer9'\] are not modules.*top-level ones: conv1"
    ):
        create_model("torchvision:resnet18", C, 1, 32, stages=["layer9"])
    with pytest.raises(ModelCheckError, match=r"\['fc'\] give no square feature map"):
        create_model("torchvision:resnet18", C, 1, 32, stages=["layer4", "fc"])
    with pytest.raises(ValueError, match="zoo model 'lenet5' has fixed stages"):
        create_model("lenet5", C, 1, 32, stages=["conv1"])


def test_layouts_become_nchw_maps():
    nhwc = torch.randn(2, 4, 4, 8)
    assert as_map(nhwc, "nhwc").shape == (2, 8, 4, 4)
    tokens = torch.randn(2, 1 + 9, 16)
    assert as_map(tokens, "tokens").shape == (2, 16, 3, 3)
    torch.testing.assert_close(as_map(tokens, "tokens")[:, :, 0, 1], tokens[:, 2])


def test_models_that_cannot_take_the_input_are_refused_with_the_size_they_need():
    with pytest.raises(ModelCheckError, match=r"cannot take 1x32x32 inputs.*63 px or more"):
        create_model("torchvision:alexnet", C, 1, 32)
    with pytest.raises(KeyError, match=r"unknown torchvision model 'resnet19'.*resnet18"):
        create_model("torchvision:resnet19", C, 1, 32)
    with pytest.raises(ValueError, match="weights and num_classes are set by cdfkd"):
        create_model("torchvision:resnet18", C, 1, 32, weights="DEFAULT")


def test_bn_prior_hooks_and_vmap_work_on_torchvision_teachers():
    torch.manual_seed(0)
    teachers = [create_model("torchvision:resnet18", C, 1, 32).eval() for _ in range(2)]
    loop = TeacherEnsemble(teachers, INFO, ["torchvision:resnet18"] * 2, mode="loop")
    fused = TeacherEnsemble(teachers, INFO, ["torchvision:resnet18"] * 2, mode="vmap")
    x = _x(3)
    a, b = loop(x, return_features=True), fused(x, return_features=True)
    for s, t in zip(
        [a.logits, *a.stages[1], *a.embedding], [b.logits, *b.stages[1], *b.embedding], strict=True
    ):
        torch.testing.assert_close(t, s, rtol=1e-4, atol=1e-4)
    with BNStatsRecorder(batchnorm_layers(loop)) as rec:
        loop(x)
        means, _, _, _ = rec.statistics()
    assert len(means) == len(batchnorm_layers(loop)) == 2 * 20


def test_torchvision_ensemble_round_trips(tmp_path: Path):
    torch.manual_seed(0)
    teachers = [create_model("torchvision:mobilenet_v3_small", C, 1, 32).eval() for _ in range(2)]
    save(
        teachers,
        tmp_path / "tv",
        INFO,
        "torchvision:mobilenet_v3_small",
        model_kwargs={"stages": ["features.3", "features"]},
    )
    ens = load_ensemble(tmp_path / "tv", expect_arch="torchvision:mobilenet_v3_small")
    x = _x()
    out = ens(x, return_features=True)
    torch.testing.assert_close(out.logits[1], teachers[1](x))
    assert [m.shape[1] for m in out.stages[0]] == [24, 576]  # the recorded stages
    shipped = ensemble_from_numpy(ensemble_to_numpy(ens))  # as a sweep's trials get it
    torch.testing.assert_close(shipped(x, return_features=True).stages[1][0], out.stages[1][0])


# ----------------------------------------------------------------------------- students


def test_structure_space_of_torchvision_backbones():
    space = student_structure_space("torchvision:mobilenet_v3_small", 1, 32)
    assert space["stages"] == STAGES["mobilenet_v3_small"][0]
    assert space["branch"]["share_until"] == (1, 3) and space["mfs"]["fuse_from"] == (0, 3)
    # regnet cannot be built on the meta device: the probe builds it for real
    assert len(student_structure_space("torchvision:regnet_x_400mf", 1, 32)["stages"]) == 4


@pytest.mark.parametrize(
    ("family", "kw"), [("branch", {"share_until": 2}), ("mfs", {"fuse_from": 1})]
)
def test_multi_header_students_on_torchvision(family, kw):
    arch = "torchvision:mobilenet_v3_small"
    student = create_student(arch, C, 1, 32, family=family, headers=2, **kw)
    x, y = _x(4), torch.randint(0, C, (4,))
    out = student.train()(x, return_features=True)
    assert out.logits.shape == (2, 4, C) and len(out.stages) == len(out.embedding) == 2
    expected = 4 if family == "branch" else 3  # mfs: one encoder map per stage from fuse_from
    assert all(len(maps) == expected and all(m.dim() == 4 for m in maps) for maps in out.stages)
    assert [e.shape for e in out.embedding] == [(4, student.feature_dim)] * 2
    loss = sum(F.cross_entropy(h, y) for h in out.logits) + sum(
        m.mean() for h in out.stages for m in h
    )
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())  # no dead weight
    student.eval()
    with torch.no_grad():
        plain, feats = student(x), student(x, return_features=True).logits
    torch.testing.assert_close(plain, feats)
    assert not torch.allclose(plain[0], plain[1])  # headers are initialised apart


def test_branch_shares_the_trunk_of_the_full_model():
    student = create_student(
        "torchvision:resnet18", C, 1, 32, family="branch", headers=2, share_until=2
    )
    shared = sum(p.numel() for p in student.trunk.parameters())
    full = sum(p.numel() for p in create_model("torchvision:resnet18", C, 1, 32).parameters())
    head = sum(p.numel() for p in student.heads[0].parameters())
    assert shared + head == full and shared > 0


class _FunctionalInBetween(nn.Module):
    """Work between two modules in the forward itself (a ViT adds its class token there)."""

    def __init__(self, num_classes: int = C) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        )
        self.c = nn.Sequential(
            nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.b(self.a(x) * 2.0)
        return self.fc(self.c(x).mean((2, 3)))


def build_functional(num_classes: int, in_channels: int = 1) -> nn.Module:
    return _FunctionalInBetween(num_classes)


def test_backbones_that_cannot_be_split_are_refused():
    from cdfkd.models import trusting

    with trusting("test_models_external"):
        arch = "test_models_external:build_functional"
        model = create_model(arch, C, 1, 32)
        assert model.stage_names == ["a", "b", "c"]
        # The doubling runs between a and b: a trunk [a, b] would skip it ...
        with pytest.raises(ModelCheckError, match=r"differs by.*cannot be split there"):
            create_student(arch, C, 1, 32, family="branch", headers=2, share_until=2)
        with pytest.raises(ModelCheckError, match=r"no trunk of whole modules computes it"):
            create_student(arch, C, 1, 32, family="mfs", headers=2)
        # ... while after a, it runs in each header's own forward.
        create_student(arch, C, 1, 32, family="branch", headers=2, share_until=1)
    with pytest.raises(ValueError, match=r"header_width=0\.5.*built as published.*family mfs"):
        create_student(
            "torchvision:resnet18", C, 1, 32, family="branch", headers=2, header_width=0.5
        )
