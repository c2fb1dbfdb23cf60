"""MMoLRE: multimodal mixture of low-rank experts, trained with DeepSpeed MoE."""
__version__ = "0.1.0"
