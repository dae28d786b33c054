"""Everything fxprune knows about each op, one entry per op, grouped by family.

    elementwise.py   activations, broadcasting binary ops, Python operators
    shape.py         size, indexing, view/reshape/flatten, permute, expand, cat, split, stack, unbind, pad, roll
    reduction.py     softmax, sum/mean/max over dims, pooling and resizing
    norm.py          BatchNorm, LayerNorm, GroupNorm, RMSNorm, PReLU (and their functional forms)
    conv_linear.py   convolutions and linear layers (modules and functional)
    attention.py     nn.MultiheadAttention, F.scaled_dot_product_attention, torchvision Swin window attention
    contraction.py   matmul, bmm, mm, einsum

See registry.py for what an entry holds and docs/adding-an-op.md for how to add one."""
from . import attention, contraction, conv_linear, elementwise, norm, reduction, shape  # noqa: F401  (they register)
from .registry import FACT_KEY, REGISTRY, OpEntry, op_fact, register

__all__ = ["REGISTRY", "OpEntry", "register", "op_fact", "FACT_KEY"]
