"""The public functional API: drop-ins for torch.nn.functional with a `backend=` keyword."""
from .attention import scaled_dot_product_attention
from .cross_entropy import cross_entropy
from .linear_cross_entropy import linear_cross_entropy
from .softmax import softmax

__all__ = ["softmax", "cross_entropy", "linear_cross_entropy", "scaled_dot_product_attention"]
