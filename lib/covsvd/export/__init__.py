"""Stage 5, export: a covsvd initialisation as a peft LoRA on a residual base, and trained adapters as a peft
LoRA on the original model."""

from .lora_delta import export_lora_delta
from .peft import export_peft

__all__ = ["export_lora_delta", "export_peft"]
