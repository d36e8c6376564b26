"""torch op → rule table: which torch callable (by name; ``F.relu``, ``torch.relu`` and ``Tensor.relu``
share one) gets which handler of :mod:`._tracer`, and its canonical op name in ``rules.spec.OPS``.

An op absent here that the explained input flows through raises ``UnsupportedOperatorError``.
"""

from __future__ import annotations

# element-wise f(x) with one varying tensor → rescale; value = canonical op name in rules.spec
RESCALE = {
    "relu": "relu", "relu6": "relu6", "leaky_relu": "leaky_relu", "prelu": "prelu", "rrelu": "leaky_relu",
    "elu": "elu", "selu": "selu", "celu": "celu", "gelu": "gelu", "silu": "silu", "mish": "mish",
    "hardswish": "hardswish", "hardsigmoid": "hardsigmoid", "hardtanh": "hardtanh", "sigmoid": "sigmoid",
    "tanh": "tanh", "softplus": "softplus", "softsign": "softsign", "logsigmoid": "logsigmoid", "log_sigmoid": "logsigmoid",
    "tanhshrink": "tanh", "softshrink": "clip", "hardshrink": "clip", "threshold": "thresholded_relu",
    "exp": "exp", "exp2": "exp", "log": "log", "log2": "log", "log10": "log", "log1p": "log1p", "expm1": "expm1",
    "sqrt": "sqrt", "rsqrt": "rsqrt", "reciprocal": "reciprocal", "square": "square", "abs": "abs",
    "__abs__": "abs", "absolute": "abs", "erf": "erf", "erfc": "erf", "sin": "sin", "cos": "cos",
    "clamp": "clip", "clip": "clip", "clamp_min": "clip", "clamp_max": "clip", "sign": "abs",
    "nan_to_num": "identity", "logit": "log",
}

# linear in the varying tensor(s): the ordinary gradient
LINEAR = frozenset("""
conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d avg_pool1d avg_pool2d avg_pool3d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d interpolate upsample upsample_nearest
upsample_bilinear pad reshape view view_as flatten unflatten permute transpose t swapaxes swapdims movedim
moveaxis squeeze unsqueeze cat concat concatenate stack hstack vstack dstack split split_with_sizes chunk
tensor_split unbind narrow select index_select gather take_along_dim __getitem__ __setitem__ expand expand_as
repeat repeat_interleave tile contiguous clone to type_as float double half bfloat16 type add __add__ __radd__
__iadd__ sub __sub__ __rsub__ __isub__ rsub neg negative __neg__ __pos__ positive sum mean cumsum flip fliplr
flipud roll diagonal diag_embed tril triu pixel_shuffle pixel_unshuffle channel_shuffle unfold fold
masked_fill masked_fill_ index_add index_copy scatter scatter_add index_put zero_ copy_ add_ sub_ neg_
squeeze_ unsqueeze_ transpose_ t_ resize_as_ as_strided narrow_copy flatten_ view_as_real real trace cpu cuda
""".split())

# two operands: bilinear when both vary (exact ½(b_x+b_r) split), linear when one does
BILINEAR = {"mul": "mul", "__mul__": "mul", "__rmul__": "mul", "__imul__": "mul", "mul_": "mul", "multiply": "mul",
            "matmul": "matmul", "__matmul__": "matmul", "__rmatmul__": "matmul", "mm": "matmul", "bmm": "bmm",
            "einsum": "einsum", "linear": "linear", "mv": "matmul", "dot": "matmul", "inner": "matmul",
            "outer": "mul", "tensordot": "matmul"}
# two operands, general: ShapleyPair when both vary, rescale in the varying one otherwise
PAIR = {"div": "div", "__truediv__": "div", "__rtruediv__": "div", "__itruediv__": "div", "div_": "div",
        "true_divide": "div", "divide": "div", "maximum": "maximum", "minimum": "minimum", "fmax": "maximum",
        "fmin": "minimum", "pow": "pow", "__pow__": "pow", "__rpow__": "pow", "pow_": "pow", "float_power": "pow",
        "max": "maximum", "min": "minimum"}   # max/min with two tensors; max(x, dim) is REDUCE_MAX
MAXPOOL = {"max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "max_pool1d_with_indices": 1,
           "max_pool2d_with_indices": 2, "max_pool3d_with_indices": 3, "adaptive_max_pool1d": 1,
           "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "adaptive_max_pool1d_with_indices": 1,
           "adaptive_max_pool2d_with_indices": 2, "adaptive_max_pool3d_with_indices": 3}
REDUCE_MAX = {"amax": "max", "amin": "min"}            # and "max"/"min" with a dim argument
SOFTMAX = {"softmax": "softmax", "log_softmax": "log_softmax", "softmin": "softmax"}
# composites rewritten into the primitives above (see ._decompositions)
DECOMPOSE = frozenset("""
layer_norm group_norm instance_norm rms_norm batch_norm multi_head_attention_forward scaled_dot_product_attention
addmm baddbmm addbmm addmv addcmul addcdiv normalize norm vector_norm linalg_vector_norm var std logsumexp glu dropout dropout1d
dropout2d dropout3d alpha_dropout feature_alpha_dropout embedding
""".split())
# no gradient: the result is a data-dependent constant ("tainted"); using it in the explained
# computation afterwards is an error, since its change between explicand and reference is unaccounted
TAINT = frozenset("""
eq ne lt le gt ge __eq__ __ne__ __lt__ __le__ __gt__ __ge__ isnan isinf isfinite isneginf isposinf argmax
argmin argsort any all detach detach_ sort topk round floor ceil trunc frac __and__ __or__ __xor__ __invert__
logical_and logical_or logical_not logical_xor bool long int nonzero heaviside signbit isclose
""".split())
# metadata and conversions out of the tensor world: run as they are
PASSTHROUGH = frozenset("""
size dim ndimension numel nelement shape stride is_contiguous element_size is_floating_point is_complex
__len__ __format__ __repr__ __str__ __bool__ __float__ __int__ __index__ __hash__ __iter__ __reversed__
__contains__ item tolist numpy data_ptr storage_offset untyped_storage get_device is_set_to new_zeros
new_ones new_empty new_full new_tensor zeros_like ones_like empty_like full_like rand_like randn_like
requires_grad_ register_hook retain_grad __array__ __deepcopy__ __reduce_ex__ __setstate__ dtype device
is_leaf grad_fn requires_grad is_cuda is_sparse ndim names layout is_quantized is_meta output_nr _version
_base __dlpack__ __dlpack_device__ equal allclose is_nested is_mkldnn is_xla is_mps
is_inference is_complex is_signed
""".split())
