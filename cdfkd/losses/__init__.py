"""Loss functions: pure functions of tensors returning scalars.

Hyperparameters are keyword arguments; methods combine the terms with their
weights. Each docstring gives the formula, the paper and the shapes.
"""

from cdfkd.losses.attention import attention_map, attention_transfer
from cdfkd.losses.bn import bn_statistics, first_layer_rescale
from cdfkd.losses.distill import (
    adversarial_discrepancy,
    feature_l1,
    kd_kl,
    l1_logits,
    preset_label_ce,
)
from cdfkd.losses.generator import activation, information_entropy, one_hot, total_variation

__all__ = [
    "activation",
    "adversarial_discrepancy",
    "attention_map",
    "attention_transfer",
    "bn_statistics",
    "feature_l1",
    "first_layer_rescale",
    "information_entropy",
    "kd_kl",
    "l1_logits",
    "one_hot",
    "preset_label_ce",
    "total_variation",
]
