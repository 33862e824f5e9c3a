"""Training API: SpecKD gated distillation losses (plain and fused with the LM head)."""

from specx.distill.fused_linear import SpecKDFusedLinearLoss, speckd_fused_linear_loss
from specx.distill.speckd import SpecKDLoss, speckd_loss

__all__ = ["SpecKDFusedLinearLoss", "SpecKDLoss", "speckd_fused_linear_loss", "speckd_loss"]
