"""gptfast.patch(model) puts gptfast's ops into a model you already have; unpatch(model) takes them out.

Two kinds of model:
- Hugging Face transformers GPT-2, GPT2LMHeadModel and GPT2Model. Attention goes through transformers' own
  attention-function registry: patch registers a function named "gptfast" (AttentionInterface, plus the
  matching mask function, so padding masks keep working) and points this model's attn_implementation at it;
  no transformers class is rewritten. The LM loss goes through ops.cross_entropy as the model's
  loss_function, or, with fused_loss=True, through ops.linear_cross_entropy straight from the hidden states:
  forward then returns logits=None whenever it is given labels, because the (B, T, V) logits are never built.
- Any other torch.nn.Module tree: its torch.nn.Softmax and torch.nn.CrossEntropyLoss submodules are swapped
  for gptfast.nn's, with the same arguments and torch's call convention (classes in dim 1). What gptfast
  cannot represent is left as torch's, with a warning: CrossEntropyLoss(weight=...) (per-class weights), and
  subclasses of either module (their forward may do more). The root module itself is never replaced.

Only the given instance changes. The model gets its own copy of its transformers config (two models built from
one GPT2Config share that object, and the unpatched one must keep its attention); torch's and transformers'
functions are never replaced, and a registered name does nothing for models that do not ask for it. Every
change is logged on the instance, so unpatch restores exactly what was there. Patching again first unpatches,
so the result is the same as one patch with the latest arguments; unpatch of an unpatched model does nothing.
"""

import copy
import functools
import inspect
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends, ops

ATTENTION_NAME = "gptfast"
SUPPORTED = (
    "transformers GPT2LMHeadModel and GPT2Model, or a torch.nn.Module tree (Softmax, CrossEntropyLoss)"
)
_RECORD = "_gptfast_patch"
_BACKEND = "gptfast_backend"  # on each patched GPT2Attention: the backend= its attention calls pass


class _Missing:
    """Marks "no own attribute was there". One instance, which copy.deepcopy and pickle keep as is (a deep
    copy of a patched model carries its undo log, and the marker must still be recognised there)."""

    def __reduce__(self):
        return "_MISSING"


_MISSING = _Missing()
_CALL = "_gptfast_patch_call"  # an undo entry that runs a function instead of restoring an attribute


class _UndoLog:
    """The instance attributes patch changed, with what was there before, undone in reverse order."""

    def __init__(self):
        self.entries: list[tuple[object, str, object]] = []

    def set(self, obj, name: str, value) -> None:
        self.entries.append((obj, name, _own_attribute(obj, name)))
        setattr(obj, name, value)

    def call(self, fn) -> None:
        """fn() runs at undo, in its place in the reverse order (a module-level function or a partial of one,
        so that deep copies and pickles of a patched model keep it)."""
        self.entries.append((fn, _CALL, None))

    def undo(self) -> None:
        for obj, name, old in reversed(self.entries):
            if name is _CALL:
                obj()
            elif old is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.entries.clear()


def _own_attribute(obj, name: str):
    """obj's own value for `name` (a registered submodule or an instance attribute), never the class's."""
    if isinstance(obj, torch.nn.Module) and name in obj._modules:
        return obj._modules[name]
    return vars(obj).get(name, _MISSING)


# ------------------------------------------------------------------------------------------ public API
def patch(
    model: torch.nn.Module,
    *,
    backend: str | None = None,
    attention: bool = True,
    cross_entropy: bool = True,
    softmax: bool = True,
    fused_loss: bool = False,
) -> torch.nn.Module:
    """Routes `model`'s attention, loss and softmax through gptfast's ops, in place; returns the model.

    backend: passed as backend= to every op the patched model calls (None: gptfast picks per call).
    attention / cross_entropy / softmax: which parts to patch. fused_loss: a GPT2LMHeadModel's loss via
    ops.linear_cross_entropy (needs cross_entropy=True; forward with labels then returns logits=None).
    Raises TypeError for other Hugging Face models and for objects that are not nn.Modules, ValueError for
    contradictory arguments, RuntimeError for a transformers release without the hooks it uses (attention
    registry: >= 4.48; a per-instance loss_function); a failed patch leaves the model unpatched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"gptfast.patch: expected {SUPPORTED}; got {type(model).__name__}")
    if backend is not None:
        backends._check_name(backend)
    if fused_loss and not cross_entropy:
        raise ValueError(
            "gptfast.patch: fused_loss=True computes the cross-entropy, so it needs cross_entropy=True"
        )
    hf_kind = _hugging_face_kind(model)
    if hf_kind is None:
        _refuse_a_wrapped_hugging_face_model(model)
    if fused_loss and hf_kind != "GPT2LMHeadModel":
        raise ValueError(
            f"gptfast.patch: fused_loss=True needs a model with an LM head (GPT2LMHeadModel); "
            f"got {type(model).__name__}"
        )
    unpatch(model)
    log = _UndoLog()
    try:
        if hf_kind is not None:
            _patch_gpt2(
                model, log, backend, attention, cross_entropy and hf_kind == "GPT2LMHeadModel", fused_loss
            )
        _swap_torch_modules(model, log, backend, softmax, cross_entropy)
    except BaseException:
        log.undo()
        raise
    setattr(model, _RECORD, log)
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Restores what patch changed on `model` (a no-op when it is not patched); returns the model."""
    log = vars(model).get(_RECORD) if isinstance(model, torch.nn.Module) else None
    if log is not None:
        log.undo()
        delattr(model, _RECORD)
    return model


def is_patched(model: torch.nn.Module) -> bool:
    return isinstance(model, torch.nn.Module) and _RECORD in vars(model)


# --------------------------------------------------------------------------------- plain module trees
def _swap_torch_modules(model, log: _UndoLog, backend, softmax: bool, cross_entropy: bool) -> None:
    from . import nn as gnn  # imported here: `import gptfast` stays light (see gptfast/__init__.py)

    left_alone = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent._modules.items()):
            path = f"{parent_name}.{name}" if parent_name else name
            if softmax and type(child) is torch.nn.Softmax:
                new = gnn.Softmax(child.dim, backend=backend)
            elif cross_entropy and type(child) is torch.nn.CrossEntropyLoss:
                if child.weight is not None:
                    left_alone.append(f"{path} (CrossEntropyLoss with per-class weight=)")
                    continue
                new = gnn.CrossEntropyLoss(
                    ignore_index=child.ignore_index,
                    reduction=child.reduction,
                    label_smoothing=child.label_smoothing,
                    backend=backend,
                )
            elif (softmax and isinstance(child, torch.nn.Softmax)) or (
                cross_entropy and isinstance(child, torch.nn.CrossEntropyLoss)
            ):
                left_alone.append(f"{path} ({type(child).__name__}, a subclass that may change forward)")
                continue
            else:
                continue
            _share_hooks(child, new)
            log.set(parent, name, new.train(child.training))
    if left_alone:
        warnings.warn(
            "gptfast.patch: left as torch's, which gptfast cannot represent: " + ", ".join(left_alone),
            stacklevel=3,
        )


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _share_hooks(old: torch.nn.Module, new: torch.nn.Module) -> None:
    """The replacement runs the module's hooks: the same dicts, so the user's handles still remove them (a
    hook that scales a loss or a softmax input had silently stopped running)."""
    for attr in _HOOK_DICTS:
        if hasattr(old, attr):
            setattr(new, attr, getattr(old, attr))
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


# ------------------------------------------------------------------------------------- transformers GPT-2
def _hugging_face_kind(model) -> str | None:
    """'GPT2LMHeadModel' or 'GPT2Model' for those, None for other modules; raises for other HF models."""
    if "transformers" not in sys.modules:
        return None  # transformers was never imported, so this cannot be one of its models
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    from transformers import GPT2LMHeadModel, GPT2Model

    for cls in (GPT2LMHeadModel, GPT2Model):
        if type(model) is cls:
            return cls.__name__
    hint = (
        " (for another GPT-2 head, patch its .transformer, a GPT2Model)"
        if hasattr(model, "transformer")
        else ""
    )
    raise TypeError(
        f"gptfast.patch: unsupported Hugging Face model {type(model).__name__}; supported: {SUPPORTED}{hint}"
    )


def _refuse_a_wrapped_hugging_face_model(model) -> None:
    """TypeError for a module that holds a Hugging Face model below it (a torch.compile wrapper, a user's
    module): patching the tree would leave that model's attention and loss as they are, silently."""
    if "transformers" not in sys.modules:
        return
    from transformers import PreTrainedModel

    for path, module in model.named_modules():
        if path and isinstance(module, PreTrainedModel):
            fix = (
                "patch the model before compiling it"
                if path.split(".")[0] == "_orig_mod"
                else f"patch that model itself (its path: {path})"
            )
            raise TypeError(
                f"gptfast.patch: {type(model).__name__} holds a Hugging Face {type(module).__name__} at "
                f"{path!r}, which patching the wrapper would leave unpatched; {fix}"
            )


def _patch_gpt2(model, log: _UndoLog, backend, attention: bool, loss: bool, fused_loss: bool) -> None:
    if attention:
        _register_attention()
        from transformers.models.gpt2.modeling_gpt2 import GPT2Attention

        config = model.config
        own = copy.deepcopy(config)
        own._attn_implementation = ATTENTION_NAME
        # Runs after the modules get `config` back: what changed on `own` while patched (a resized vocab, a
        # pad token) goes to the original, which unpatch would otherwise hand back stale.
        log.call(functools.partial(_merge_config, own, config))
        for module in model.modules():
            if getattr(module, "config", None) is config:
                log.set(module, "config", own)
            if isinstance(module, GPT2Attention):
                log.set(module, _BACKEND, backend)
    if loss and fused_loss:
        forward = functools.partial(_fused_lm_forward, model, model.forward, backend)
        # A partial (not a closure) survives copy.deepcopy; the signature is the original's, which callers
        # such as transformers' Trainer inspect to pick the batch's columns.
        forward.__signature__ = inspect.signature(model.forward)
        log.set(model, "forward", forward)
    elif loss:
        # transformers' loss_function property returns the instance's `_loss_function` when there is one
        # (what its setter stores); the log records that attribute. Checked, as older releases lack it.
        lm_loss = functools.partial(causal_lm_loss, backend=backend)
        log.set(model, "_loss_function", lm_loss)
        if getattr(model, "loss_function", None) is not lm_loss:
            raise RuntimeError(
                f"gptfast.patch: transformers {_transformers_version()} has no per-instance "
                f"{type(model).__name__}.loss_function to route the loss through; upgrade transformers, or "
                "pass fused_loss=True (gptfast computes the loss itself) or cross_entropy=False"
            )


def _merge_config(patched, original) -> None:
    for key, value in vars(patched).items():
        if "attn_implementation" not in key:
            setattr(original, key, value)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@functools.cache
def _register_attention() -> None:
    """Registers "gptfast" with transformers' attention (and, where it has one, mask) registry, once."""
    try:
        import transformers.models.gpt2.modeling_gpt2 as modeling_gpt2
    except ImportError as e:
        raise RuntimeError(f"gptfast.patch: transformers' GPT-2 is not importable ({e})") from None
    if not hasattr(modeling_gpt2, "ALL_ATTENTION_FUNCTIONS"):
        raise RuntimeError(
            f"gptfast.patch: transformers {_transformers_version()}'s GPT-2 has no attention-function "
            "registry (ALL_ATTENTION_FUNCTIONS, transformers >= 4.48); upgrade it or pass attention=False"
        )
    try:
        from transformers import AttentionInterface
    except ImportError:  # 4.48 and 4.49: the registry is a plain dict
        modeling_gpt2.ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] = hf_attention
    else:
        AttentionInterface.register(ATTENTION_NAME, hf_attention)
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return  # before masking_utils, GPT2Model builds the mask itself (see hf_attention)
    # An implementation without a mask function gets no mask at all, padding included; sdpa's is the one that
    # fits ours: boolean (True = attend), or None when is_causal alone is exact.
    AttentionMaskInterface.register(ATTENTION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _gpt2_scale(module, head_dim: int) -> float:
    # transformers 4.x does not pass `scaling`; these are the attributes its eager GPT-2 attention reads.
    scale = head_dim**-0.5 if getattr(module, "scale_attn_weights", True) else 1.0
    if getattr(module, "scale_attn_by_inverse_layer_idx", False):
        scale /= float(module.layer_idx + 1)
    return scale


def hf_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function contract on ops.scaled_dot_product_attention.

    query (B, H, L, D), key and value (B, Hk, S, D) -> (attn_output (B, L, H, D), None): no attention weights,
    as with sdpa. attention_mask: None (causal self-attention, or none at all), a 4-D bool mask (True =
    attend) or an additive float mask, the complete mask where transformers builds masks itself
    (masking_utils), broadcast over the queries as SDPA does. Before masking_utils, a (B, 1, 1, S) mask for
    L > 1 is padding only (GPT2Model built that for implementations other than sdpa), so causality is added.
    """
    if kwargs.get("head_mask") is not None:
        raise ValueError("gptfast attention: head_mask is not supported; unpatch the model to use it")
    L, S = query.shape[-2], key.shape[-2]
    if scaling is None:
        scaling = _gpt2_scale(module, query.shape[-1])
    causal_module = not getattr(module, "is_cross_attention", False) and getattr(module, "is_causal", True)
    if is_causal is not None and attention_mask is None:
        causal_module = causal_module and is_causal
    mask, causal = attention_mask, False
    if mask is not None:
        if mask.dtype != torch.bool and mask.dtype != query.dtype:
            # e.g. a float32 mask with bf16 queries under autocast; its finfo(float32).min would round to -inf
            # in bf16 (and empty a padding row), so it becomes the queries' own most negative value.
            floor = torch.finfo(query.dtype).min
            mask = torch.where(mask == float("-inf"), mask, mask.clamp_min(floor)).to(query.dtype)
        if causal_module and mask.shape[-2] == 1 and L > 1 and not _masks_built_by_transformers():
            mask = _and_causal(mask, L, S)
    elif causal_module and L > 1:
        if L == S:
            causal = True
        else:
            # The L queries are the last of S positions (a KV cache): bottom-right aligned, where SDPA's
            # is_causal is top-left aligned.
            mask = _bottom_right_causal(L, S, query.device)
    out = ops.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
        backend=getattr(module, _BACKEND, None),
    )  # (B, H, L, D)
    return out.transpose(1, 2).contiguous(), None


@functools.cache
def _masks_built_by_transformers() -> bool:
    # With masking_utils a user's own 4-D mask reaches the attention as it is, the complete mask: adding
    # causality to a (B, 1, 1, S) one there turned a bidirectional mask causal, silently.
    try:
        import transformers.masking_utils  # noqa: F401
    except ImportError:
        return False
    return True


def _bottom_right_causal(L: int, S: int, device) -> Tensor:
    """(L, S) bool: query i, the (S - L + i)-th position, sees keys j <= S - L + i."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=S - L)


def _and_causal(padding: Tensor, L: int, S: int) -> Tensor:
    """A padding mask (..., 1, S), bool or additive, and the bottom-right aligned causal mask (L, S)."""
    causal = _bottom_right_causal(L, S, padding.device)
    if padding.dtype == torch.bool:
        return padding & causal
    return torch.where(causal, padding, torch.finfo(padding.dtype).min)  # (..., L, S)


def _shifted_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """(B, T) -> (B, T): position t is scored on token t + 1; the last position has nothing to predict."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _reduce(loss_fn, num_items_in_batch):
    # transformers' convention: with num_items_in_batch (gradient accumulation) a sum over it, else the mean.
    if num_items_in_batch is None:
        return loss_fn("mean")
    total = loss_fn("sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    *,
    backend: str | None = None,
    **kwargs,
) -> Tensor:
    """transformers' ForCausalLMLoss on ops.cross_entropy: logits (B, T, V), labels (B, T) -> scalar.

    The labels are shifted, not the logits (no copy of them), and half-precision logits are not upcast first:
    the kernels accumulate in fp32, and the loss comes back in fp32, as transformers' does.
    """
    if shift_labels is None:
        shift_labels = _shifted_labels(labels, ignore_index)
    rows, targets = logits.reshape(-1, vocab_size), shift_labels.reshape(-1).to(logits.device)
    return _reduce(
        lambda reduction: ops.cross_entropy(
            rows, targets, ignore_index=ignore_index, reduction=reduction, out_dtype=torch.float32,
            backend=backend,
        ),
        num_items_in_batch,
    )


def _fused_lm_forward(model, original_forward, backend, *args, **kwargs):
    """GPT2LMHeadModel.forward whose loss comes from ops.linear_cross_entropy on the hidden states.

    Without labels it is the original forward. With labels it runs model.transformer on the same arguments
    and returns the loss with logits=None.
    """
    bound = inspect.signature(original_forward).bind(*args, **kwargs)
    named = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
    labels = named.pop("labels", None)
    if labels is None:
        return original_forward(*args, **kwargs)
    shift_labels = named.pop("shift_labels", None)
    num_items_in_batch = named.pop("num_items_in_batch", None)
    ignore_index = named.pop("ignore_index", -100)
    return_dict = named.pop("return_dict", None)
    named.pop("logits_to_keep", None)  # there are no logits to slice
    if "return_dict" in inspect.signature(model.transformer.forward).parameters:
        named["return_dict"] = True  # transformers 4.x: a ModelOutput, whatever the config says
    out = model.transformer(**named)
    hidden, weight = out.last_hidden_state, model.lm_head.weight  # (B, T, C), (V, C)
    if torch.is_autocast_enabled(hidden.device.type):
        # Custom ops are outside autocast's lists: cast as autocast would for the lm_head matmul.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if shift_labels is None:
        shift_labels = _shifted_labels(labels, ignore_index)
    targets = shift_labels.to(hidden.device)
    loss = _reduce(
        lambda reduction: ops.linear_cross_entropy(
            hidden, weight, targets, ignore_index=ignore_index, reduction=reduction, out_dtype=torch.float32,
            backend=backend,
        ),
        num_items_in_batch,
    )
    from transformers.modeling_outputs import CausalLMOutputWithCrossAttentions

    result = CausalLMOutputWithCrossAttentions(
        loss=loss, logits=None, **{k: v for k, v in out.items() if k != "last_hidden_state"}
    )
    if return_dict is None:
        return_dict = getattr(model.config, "return_dict", True)  # use_return_dict is deprecated in 5.x
    if return_dict:
        return result
    loss, *rest = result.to_tuple()  # which drops the None logits: keep their place, so out[1] stays logits
    return (loss, None, *rest)
