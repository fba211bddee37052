"""Images to calibrate and check an exported student with, when no real data may be used.

Data-free distillation trained the student on its generator's images, so those are the
inputs whose activation ranges int8 quantization should cover: the run's generator is
rebuilt from its last checkpoint (``RunDir.load_generator``) and sampled in eval mode
(as the data-free proxy is), class-balanced for a conditional generator, from a fixed
seed. Runs without a generator (``kd_real``) have none to offer.
"""

from __future__ import annotations

import torch

from cdfkd.generators import LatentGenerator

#: offset of the calibration stream from the run's seed: not the training draws
CALIBRATION_SEED_OFFSET = 2_000_003


@torch.no_grad()
def generated_images(
    generator: LatentGenerator, count: int, seed: int, batch_size: int = 64
) -> torch.Tensor:
    """``count`` generated images (count, C, H, W) on CPU, drawn from ``seed``."""
    rng = torch.Generator().manual_seed(seed + CALIBRATION_SEED_OFFSET)
    was_training = generator.training
    generator.eval()
    try:
        out = []
        for start in range(0, count, batch_size):
            n = min(batch_size, count - start)
            z, y = generator.sample(n, "cpu", rng, balanced=True)
            out.append(generator(z, y) if y is not None else generator(z))
        return torch.cat(out).float()
    finally:
        generator.train(was_training)
