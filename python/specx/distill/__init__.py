"""Training API: SpecKD gated distillation losses (plain and fused with the LM head); DeepKD
losses, DTM curriculum and optimizer."""

from specx.distill.deepkd import DeepKDOptimizer, deepkd_losses, deepkd_train_step, dtm_k
from specx.distill.fused_linear import SpecKDFusedLinearLoss, speckd_fused_linear_loss
from specx.distill.speckd import SpecKDLoss, speckd_loss

__all__ = ["DeepKDOptimizer", "SpecKDFusedLinearLoss", "SpecKDLoss", "deepkd_losses", "deepkd_train_step", "dtm_k",
           "speckd_fused_linear_loss", "speckd_loss"]
