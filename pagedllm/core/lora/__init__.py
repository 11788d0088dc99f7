"""LoRA adapters (vLLM's multi-LoRA serving): requests name a PEFT adapter, which adds its low-rank update to the
base model's projections for that request's tokens only; several adapters and the base model share a batch."""
