"""Attention: Q, K, V, O for every packing, and the per-head circuits.

Which modules need an attention kind:

* **Packed weights** — ``nn.MultiheadAttention`` (``in_proj_weight``, or
  separate ``q/k/v_proj_weight``, plus ``out_proj``) and GPT-2's attention
  (``c_attn``, a transformers ``Conv1D`` of shape in × 3d, plus ``c_proj``).
  Their kinds split the packed weight into Q, K and V (row slices of the one
  stored tensor, no copy) and claim their children, so the packed weight is
  never also tracked whole.
* **Separate projections** (BERT's ``query/key/value`` + ``output.dense``,
  T5's ``q/k/v/o``, ViT's and Llama's ``q_proj…o_proj``) are already four
  Linear layers; in the default mode the Linear kind tracks them under their
  own names. Their attention kinds only act in ``"circuits"`` mode.

Modes (:class:`~robustcompress.layers.ViewOptions`):

* ``attention="projections"`` (default) — Q, K, V, O as four matrices. They
  are what prune and truncate change, each is one cheap weight read, and the
  penalties' gradients land on the stored weights directly.
* ``attention="circuits"`` — per head ``h``, ``W_O^h W_V^h`` (the value path,
  ``d × d``) and ``W_Q^hᵀ W_K^h`` (the bilinear form of the attention
  logits, before the ``1/√d_h`` scale), each one operator of rank ``d_h``.
  ``σ₁(W_Q)σ₁(W_K)`` and ``σ₁(W_V)σ₁(W_O)`` only upper-bound these; the
  circuits are the tighter, per-head quantities (with grouped-query
  attention, head ``h`` reads key/value head ``h // (H / H_kv)``).

Example:
    >>> from torch import nn
    >>> from .registry import ViewOptions, layer_views
    >>> mha = nn.MultiheadAttention(8, 2)
    >>> [v.name for v in layer_views(mha)]
    ['q', 'k', 'v', 'out_proj']
    >>> [v.name for v in layer_views(mha, ViewOptions(attention="circuits"))]
    ['ov.h0', 'qk.h0', 'ov.h1', 'qk.h1']
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .builtin import weight_of
from .registry import LayerKind, LayerView, ViewOptions, layer_kind, register_layer_kind
from .specs import LowRankSpec, MatrixSpec, Spec, slice_cols, slice_rows

__all__ = ["attention_views", "HeadLayout", "head_layout", "set_num_heads"]

_GPT2_ATTENTION = "transformers.models.gpt2.modeling_gpt2.GPT2Attention"
#: HF attention modules with separate Q/K/V/O Linear submodules (circuits mode only).
_HF_SEPARATE = (
    "transformers.models.bert.modeling_bert.BertAttention",
    "transformers.models.roberta.modeling_roberta.RobertaAttention",
    "transformers.models.vit.modeling_vit.ViTAttention",
    "transformers.models.t5.modeling_t5.T5Attention",
    "transformers.models.llama.modeling_llama.LlamaAttention",
)


def _one_view(module: nn.Module, prefix: str, options: ViewOptions) -> tuple[Spec, tuple[str, ...]]:
    """The single operator of a child projection (plain, parametrized or LoRA-wrapped), params prefixed."""
    kind = layer_kind(module)
    if kind is None:
        raise ValueError(f"{prefix} ({type(module).__name__}) has no registered layer kind")
    views = kind.views(module, options)
    if len(views) != 1:
        raise ValueError(f"{prefix} ({type(module).__name__}) has {len(views)} operators; expected one projection")
    return views[0].spec, tuple(f"{prefix}.{p}" for p in views[0].params)


def attention_views(q: tuple[Spec, tuple[str, ...]], k: tuple[Spec, tuple[str, ...]],
                    v: tuple[Spec, tuple[str, ...]], o: tuple[Spec, tuple[str, ...]], names: tuple[str, str, str, str],
                    heads: int, head_dim: int, options: ViewOptions) -> list[LayerView]:
    """Views of one attention block from its four projections ``(descriptor, params)``.

    ``"projections"``: the four projections under ``names``. ``"circuits"``:
    per head ``ov.h{h}`` = ``O_h V_{g(h)}`` and ``qk.h{h}`` = ``Q_hᵀ K_{g(h)}``
    with ``Q_h`` rows ``h·d_h…`` of Q, ``O_h`` the same columns of O, and
    ``g(h) = h // (H / H_kv)`` (grouped-query attention).

    Args:
        q, k, v, o: ``(descriptor, parameter names)`` of each projection (operator orientation: out × in).
        names: the view names of the four projections.
        heads: number of query heads ``H``.
        head_dim: ``d_h``.
        options: the view options.

    Returns:
        The views.

    Example:
        >>> import torch
        >>> w = {n: torch.randn(4, 4) for n in "qkvo"}
        >>> spec = {n: (MatrixSpec(lambda n=n: w[n]), (n,)) for n in "qkvo"}
        >>> views = attention_views(spec["q"], spec["k"], spec["v"], spec["o"], tuple("qkvo"), 2, 2,
        ...                         ViewOptions(attention="circuits"))
        >>> torch.allclose(views[0].spec.matrix(), w["o"][:, :2] @ w["v"][:2])
        True
    """
    if options.attention == "projections":
        return [LayerView(n, spec, params) for n, (spec, params) in zip(names, (q, k, v, o))]
    for label, (spec, _) in zip(names, (q, k, v, o)):
        if not isinstance(spec, MatrixSpec):
            raise ValueError(f"attention='circuits' needs plain projection weights, but {label!r} is a "
                             f"{type(spec).__name__} (a LoRA or factorised projection); use attention='projections'")
    q_rows, kv_rows = q[0].shape[0], k[0].shape[0]
    if q_rows != heads * head_dim or kv_rows % head_dim or heads % (kv_rows // head_dim):
        raise ValueError(f"Attention shapes do not fit {heads} heads of size {head_dim}: Q has {q_rows} rows, "
                         f"K/V {kv_rows}")
    group = heads // (kv_rows // head_dim)
    views = []
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        g = h // group
        kv = slice(g * head_dim, (g + 1) * head_dim)
        q_h, k_h = slice_rows(q[0], rows), slice_rows(k[0], kv)
        v_h, o_h = slice_rows(v[0], kv), slice_cols(o[0], rows)
        views.append(LayerView(f"ov.h{h}", LowRankSpec(a=v_h, b=o_h), tuple(dict.fromkeys(v[1] + o[1]))))
        views.append(LayerView(f"qk.h{h}", LowRankSpec(a=k_h, b=q_h.T), tuple(dict.fromkeys(q[1] + k[1]))))
    return views


def _mha_views(m: nn.MultiheadAttention, options: ViewOptions) -> list[LayerView]:
    e = m.embed_dim
    if m._qkv_same_embed_dim:
        get, params = weight_of(m, "in_proj_weight")
        q, k, v = ((MatrixSpec(get, rows=slice(i * e, (i + 1) * e)), params) for i in range(3))
    else:
        q, k, v = ((MatrixSpec(g), p) for g, p in (weight_of(m, f"{x}_proj_weight") for x in "qkv"))
    o = _one_view(m.out_proj, "out_proj", options)
    return attention_views(q, k, v, o, ("q", "k", "v", "out_proj"), m.num_heads, m.head_dim, options)


def _gpt2_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    e = m.embed_dim
    packed, params = _one_view(m.c_attn, "c_attn", options)
    if getattr(m, "is_cross_attention", False):
        q = _one_view(m.q_attn, "q_attn", options)
        k, v = ((slice_rows(packed, slice(i * e, (i + 1) * e)), params) for i in range(2))
        names = ("q_attn", "c_attn.k", "c_attn.v", "c_proj")
    else:
        q, k, v = ((slice_rows(packed, slice(i * e, (i + 1) * e)), params) for i in range(3))
        names = ("c_attn.q", "c_attn.k", "c_attn.v", "c_proj")
    o = _one_view(m.c_proj, "c_proj", options)
    return attention_views(q, k, v, o, names, m.num_heads, m.head_dim, options)


_SEPARATE_PATHS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("q", "k", "v", "o"),
                   ("self.query", "self.key", "self.value", "output.dense"))


def _separate_paths(m: nn.Module) -> tuple[str, str, str, str]:
    for paths in _SEPARATE_PATHS:
        try:
            for p in paths:
                m.get_submodule(p)
        except AttributeError:
            continue
        return paths
    raise ValueError(f"{type(m).__name__}: found none of the projection layouts {_SEPARATE_PATHS}")


def _head_dim(m: nn.Module) -> int:
    for owner, attr in ((m, "head_dim"), (m, "key_value_proj_dim"), (getattr(m, "self", None), "attention_head_size")):
        if owner is not None and isinstance(getattr(owner, attr, None), int):
            return getattr(owner, attr)
    raise ValueError(f"{type(m).__name__}: cannot find the head size (head_dim, key_value_proj_dim or "
                     "self.attention_head_size)")


def _separate_views(m: nn.Module, options: ViewOptions) -> list[LayerView]:
    if options.attention == "projections":
        return []  # the Q/K/V/O Linear children are tracked by the Linear kind
    paths = _separate_paths(m)
    projections = [_one_view(m.get_submodule(p), p, options) for p in paths]
    dh = _head_dim(m)
    views = attention_views(*projections, paths, projections[0][0].shape[0] // dh, dh, options)
    # Other weight-bearing submodules (T5's relative position bias) keep their own views.
    taken = set(paths)
    for name, child in m.named_modules():
        if not name or name in taken or any(name.startswith(t + ".") for t in taken):
            continue
        kind = layer_kind(child)
        own = [p for p, t in child.named_parameters(recurse=False) if t.dim() >= 2]
        if kind is None:
            if own:
                raise ValueError(f"{type(m).__name__}.{name} ({type(child).__name__}) holds weights {own} with no "
                                 "registered layer kind; attention='circuits' cannot leave it out silently")
            continue
        if kind.claims(child, options):
            taken.add(name)
        for view in kind.views(child, options):
            full = ".".join(x for x in (name, view.name) if x)
            views.append(LayerView(full, view.spec, tuple(f"{name}.{p}" for p in view.params),
                                   penalize=kind.penalize and view.penalize))
    return views


@dataclass(frozen=True)
class HeadLayout:
    """Where one attention block's heads lie, for structured pruning (the ``"heads"`` prune rule).

    Head ``h`` owns rows ``h·d_h … (h+1)·d_h − 1`` of Q, K and V and the same
    columns of O. ``projections`` are the submodule paths of the Q, K, V, O
    ``nn.Linear`` layers; ``None`` for ``nn.MultiheadAttention``, whose Q/K/V
    are row blocks of ``in_proj_weight`` (or ``q/k/v_proj_weight``) and O is ``out_proj``.
    """

    projections: tuple[str, str, str, str] | None
    heads: int
    head_dim: int


def head_layout(module: nn.Module) -> HeadLayout | None:
    """The head layout of an attention block of a ``"heads"`` kind (None when its projections are not Linear).

    GPT-2's attention returns None: its Q/K/V are one transformers ``Conv1D``,
    which structured pruning cannot split.

    Example:
        >>> head_layout(nn.MultiheadAttention(8, 2))
        HeadLayout(projections=None, heads=2, head_dim=4)
    """
    if isinstance(module, nn.MultiheadAttention):
        return HeadLayout(None, module.num_heads, module.head_dim)
    kind = layer_kind(module)
    if kind is not HF_ATTENTION:
        return None
    paths = _separate_paths(module)
    if not all(type(module.get_submodule(p)) is nn.Linear for p in paths):
        return None
    dh = _head_dim(module)
    return HeadLayout(paths, module.get_submodule(paths[0]).out_features // dh, dh)


def set_num_heads(module: nn.Module, heads: int) -> None:
    """Record a new head count on an attention block after heads were removed (its head size unchanged).

    Updates the attributes transformers' attention blocks read
    (``num_attention_heads``, ``num_heads``, ``all_head_size``, ``inner_dim``
    on the block and its ``self`` submodule); the shared model config is left
    alone, since layers may now differ in their head counts.

    Example:
        >>> class Block(nn.Module):
        ...     num_attention_heads, attention_head_size, all_head_size = 4, 8, 32
        >>> b = Block(); set_num_heads(b, 3); (b.num_attention_heads, b.all_head_size)
        (3, 24)
    """
    dh = None
    for owner in (module, getattr(module, "self", None)):
        if owner is None:
            continue
        for attr in ("head_dim", "attention_head_size", "key_value_proj_dim"):
            if isinstance(getattr(owner, attr, None), int):
                dh = getattr(owner, attr)
        for attr in ("num_attention_heads", "num_heads", "n_heads"):
            if isinstance(getattr(owner, attr, None), int):
                setattr(owner, attr, heads)
        for attr in ("all_head_size", "inner_dim"):
            if isinstance(getattr(owner, attr, None), int) and dh is not None:
                setattr(owner, attr, heads * dh)


def _claims_in_circuits(module: nn.Module, options: ViewOptions) -> bool:
    return options.attention == "circuits"


MULTIHEAD_ATTENTION = register_layer_kind(LayerKind(
    "multihead_attention", (nn.MultiheadAttention,), _mha_views, feature_axis=-1, can_be_head=False, prune="heads",
    claims_children=True))
GPT2_ATTENTION = register_layer_kind(LayerKind(
    "gpt2_attention", (_GPT2_ATTENTION,), _gpt2_views, feature_axis=-1, can_be_head=False, prune="heads",
    claims_children=True))
HF_ATTENTION = register_layer_kind(LayerKind(
    "hf_attention", _HF_SEPARATE, _separate_views, feature_axis=-1, can_be_head=False, prune="heads",
    claims_children=_claims_in_circuits))
