"""Generators: shapes, conditioning, sampling, gradients, and a short conditional training run."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdfkd.generators import (
    ConditionalGenerator,
    DCGANGenerator,
    create_generator,
    list_generators,
    sample_labels,
)


def _info(channels=3, image_size=32, num_classes=10):
    return SimpleNamespace(channels=channels, image_size=image_size, num_classes=num_classes)


def test_registry_names_and_unknown_name():
    assert {"dcgan", "conditional"} <= set(list_generators())
    with pytest.raises(KeyError, match="known: .*dcgan"):
        create_generator("nope", _info())


@pytest.mark.parametrize("name", ["dcgan", "conditional"])
@pytest.mark.parametrize("channels,image_size", [(1, 32), (3, 32), (3, 64)])
def test_output_shapes(name, channels, image_size):
    gen = create_generator(name, _info(channels, image_size), nz=16, width=16)
    z, y = gen.sample(3)
    assert z.shape == (3, 16)
    assert (y is None) == (name == "dcgan")
    out = gen(z, y)
    assert out.shape == (3, channels, image_size, image_size)
    assert gen.image_shape == (channels, image_size, image_size)


@pytest.mark.parametrize(
    "image_size,seed,stages", [(32, 8, 2), (64, 8, 3), (128, 8, 4), (224, 14, 4)]
)
def test_depth_follows_image_size(image_size, seed, stages):
    gen = DCGANGenerator(3, image_size, nz=8, width=8)
    assert gen.body.seed_size == seed and len(gen.body.stages) == stages


def test_default_32px_layout_matches_dafl():
    body = create_generator("dcgan", _info()).body
    assert body.project.in_features == 100 and body.project.out_features == 128 * 8 * 8
    convs = [m for m in body.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(128, 128), (128, 64), (64, 3)]
    assert all(bn.eps == 1e-5 for bn in body.modules() if isinstance(bn, nn.BatchNorm2d))
    assert not body.output_norm.affine


def test_output_is_standardised_per_channel():
    gen = create_generator("dcgan", _info(), nz=8, width=8).train()
    out = gen(torch.randn(16, 8))
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(out.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-2)


def test_bad_sizes_and_labels_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        DCGANGenerator(3, 30)
    uncond = DCGANGenerator(3, 16, nz=4, width=8)
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="z must be"):
        uncond(torch.randn(2, 5))
    cond = ConditionalGenerator(3, 16, num_classes=5, nz=4, width=8)
    with pytest.raises(ValueError, match="needs labels"):
        cond(torch.randn(2, 4))
    with pytest.raises(ValueError, match="class ids"):
        cond(torch.randn(2, 4), torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize("label_encoding", ["embedding", "onehot"])
def test_conditional_labels_change_the_image(label_encoding):
    gen = create_generator(
        "conditional", _info(3, 16, 5), nz=8, width=8, label_encoding=label_encoding
    ).eval()
    z = torch.randn(1, 8).repeat(4, 1)
    out = gen(z, torch.tensor([0, 1, 2, 0]))
    assert torch.equal(out[0], out[3])
    assert not torch.allclose(out[0], out[1]) and not torch.allclose(out[1], out[2])


def test_sample_is_reproducible_and_balanced():
    gen = create_generator("conditional", _info(num_classes=4), nz=8, width=8)
    draws = [gen.sample(10, "cpu", torch.Generator().manual_seed(3)) for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    z, y = draws[0]
    assert z.shape == (10, 8) and y.dtype == torch.long
    assert sorted(torch.bincount(y, minlength=4).tolist()) == [2, 2, 3, 3]
    uniform = sample_labels(1000, 4, generator=torch.Generator().manual_seed(0), balanced=False)
    assert uniform.min() >= 0 and uniform.max() <= 3


@pytest.mark.parametrize("name", ["dcgan", "conditional"])
def test_gradient_flows_to_z(name):
    gen = create_generator(name, _info(1, 16, 3), nz=8, width=8)
    z, y = gen.sample(4)
    z.requires_grad_(True)
    gen(z, y).pow(2).mul(torch.randn(4, 1, 16, 16)).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


def _fixed_random_classifier(channels, num_classes, image_size):
    # No global pooling: a linear head on the flattened map (many more features
    # than classes) can reach every class; with pooled ReLU features a random
    # head sometimes leaves a class unreachable for any input.
    net = nn.Sequential(
        nn.Conv2d(channels, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * (image_size // 4) ** 2, num_classes),
    )
    return net.eval().requires_grad_(False)


def test_conditional_generator_learns_preset_labels():
    """CGDD's generator objective CE(teacher(G(z, y)), y) drives a fixed classifier to say y."""
    num_classes, batch = 10, 40
    classifier = _fixed_random_classifier(3, num_classes, image_size=16)
    gen = create_generator("conditional", _info(3, 16, num_classes), nz=16, width=16)
    opt = torch.optim.Adam(gen.parameters(), lr=1e-2)
    rng = torch.Generator().manual_seed(0)
    for _ in range(150):
        z, y = gen.sample(batch, "cpu", rng)
        loss = F.cross_entropy(classifier(gen(z, y)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        z, y = gen.sample(200, "cpu", rng)
        hit_rate = (classifier(gen(z, y)).argmax(dim=1) == y).float().mean().item()
    assert hit_rate >= 0.9, f"only {hit_rate:.2f} of samples classified as their preset label"
