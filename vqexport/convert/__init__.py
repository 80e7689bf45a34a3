"""Dense output layer -> VQ-Logits head: clustering, initialisation, distillation, the model card."""
