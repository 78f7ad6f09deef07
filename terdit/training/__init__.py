"""Training: the QAT trainer (one process or torchrun) and data-free distillation."""
