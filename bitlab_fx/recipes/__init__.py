"""Training recipes for QAT: quantization warm-up (:class:`QuantWarmup`) and distillation from the float model
(:func:`distill`, docs/qat-llm.md); :func:`retain_freed_memory` for faster CPU training steps."""
from .allocator import retain_freed_memory
from .distill import DistillConfig, DistillResult, distill, lr_factor
from .losses import hidden_mse, kl_logits, lm_loss
from .progress import Progress
from .teacher_cache import TeacherCache
from .warmup import QuantWarmup

__all__ = ["QuantWarmup", "DistillConfig", "DistillResult", "distill", "lr_factor", "kl_logits", "lm_loss",
           "hidden_mse", "Progress", "TeacherCache", "retain_freed_memory"]
