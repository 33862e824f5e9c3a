"""Training API: SpecKD gated distillation losses."""

from specx.distill.speckd import SpecKDLoss, speckd_loss

__all__ = ["SpecKDLoss", "speckd_loss"]
