"""gptfast.patch: a patched model computes what it computed before, and unpatch puts everything back.

The Hugging Face checks build a randomly initialised GPT-2 from a small GPT2Config (no download) and compare
the patched model with the unpatched one, using design.md's rule on the loss, the logits and every parameter
gradient: out = patched in the dtype under test, torch_same_dtype = unpatched in that dtype, ref = unpatched
in the higher precision (float64 for float32).
"""

import copy
import warnings

import pytest
import torch

import gptfast
from gptfast import backends
from gptfast.patch import is_patched
from gptfast.testing import assert_close, reference_dtype
from backends_under_test import cases

transformers = pytest.importorskip(
    "transformers",
    reason="transformers is an optional extra: pip install gptfast[hf] (make test installs it)",
)
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel, GPT2Model  # noqa: E402

# Every backend that runs attention and both cross-entropies on CPU tensors here (triton via the interpreter).
CPU_BACKENDS = sorted(
    {b for b, d in cases("attention") if d == "cpu"}
    & {b for b, d in cases("cross_entropy") if d == "cpu"}
    & {b for b, d in cases("linear_cross_entropy") if d == "cpu"}
)
VOCAB = 61  # odd, so no vocab-size alignment hides an indexing bug


def gpt2_config(**overrides) -> GPT2Config:
    # Head dim 16: the smallest the Triton kernels take (tl.dot needs K >= 16). Dropout off unless asked: the
    # comparison needs the same function on both sides.
    base = dict(
        vocab_size=VOCAB, n_positions=32, n_embd=64, n_layer=2, n_head=4,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return GPT2Config(**{**base, **overrides})


def batch(B=2, T=12, padding=False, device="cpu"):
    """ids, attention_mask, labels; with padding, row 0 is right-padded, row 1 left-padded (-100 labels)."""
    ids = torch.randint(0, VOCAB, (B, T), device=device)
    mask = torch.ones(B, T, dtype=torch.long, device=device)
    if padding:
        mask[0, T - 3 :] = 0
        mask[1, :4] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # an ignored label inside the sequence too
    if padding:
        # Left padding: the last pad position (3) would be scored on the first real token, and a pad
        # position's output is not defined by the model (every key is masked there; transformers' own
        # attention paths and versions give it different values and gradients). Real data leaves it unscored.
        labels[1, 4] = -100
    return ids, (mask if padding else None), labels


def _step(model, ids, mask, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.loss.detach(), None if out.logits is None else out.logits.detach(), grads


def check_parity(backend, device="cpu", dtype=torch.float32, padding=False, fused_loss=False, **config):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config(**config)).to(device)
    ids, mask, labels = batch(padding=padding, device=device)
    ref = _step(copy.deepcopy(base).to(reference_dtype(dtype)), ids, mask, labels)
    torch_out = _step(base.to(dtype), ids, mask, labels)
    patched = gptfast.patch(copy.deepcopy(base), backend=backend, fused_loss=fused_loss)
    out = _step(patched, ids, mask, labels)
    assert_close(out[0], ref[0], torch_out[0], "loss")
    if fused_loss:
        assert out[1] is None  # the fused loss never builds the logits
    else:
        # A padding position's logits are not defined by the model: transformers' own attention paths
        # differ there (CUDA sdpa unmasks fully padded rows, eager averages them); no loss or gradient reads
        # them.
        keep = (mask != 0) if mask is not None else torch.ones(out[1].shape[:2], dtype=torch.bool)
        keep = keep.to(out[1].device)
        assert_close(out[1][keep], ref[1][keep], torch_out[1][keep], "logits")
    assert out[2].keys() == ref[2].keys()
    for name, grad in out[2].items():
        assert_close(grad, ref[2][name], torch_out[2][name], f"grad of {name}")


# ------------------------------------------------------------------------------------------------- parity
def _parity_cases():
    # The interpreter takes 2-6 s per case: the fast suite runs triton on two of the four (each attention path
    # and each loss once), the other two are slow.
    for backend in CPU_BACKENDS:
        for padding in (False, True):
            for fused_loss in (False, True):
                slow = backend == "triton" and padding != fused_loss
                yield pytest.param(
                    backend,
                    padding,
                    fused_loss,
                    id=f"{backend}-{'padded' if padding else 'causal'}-"
                    f"{'linear_cross_entropy' if fused_loss else 'cross_entropy'}",
                    marks=[pytest.mark.slow] if slow else [],
                )


@pytest.mark.parametrize("backend, padding, fused_loss", list(_parity_cases()))
def test_gpt2_lm_head_matches_unpatched(backend, padding, fused_loss):
    check_parity(backend, padding=padding, fused_loss=fused_loss)


def test_fused_loss_tuple_output_keeps_the_logits_place():
    # return_dict=False: (loss, logits, past_key_values, ...) unpatched; the fused loss has logits=None, and
    # dropping it (as ModelOutput.to_tuple does) had moved the cache into out[1].
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config()).eval()
    patched = gptfast.patch(copy.deepcopy(base), backend="reference", fused_loss=True)
    ids = torch.randint(0, VOCAB, (2, 8))
    theirs = base(ids, labels=ids, return_dict=False, use_cache=True)
    ours = patched(ids, labels=ids, return_dict=False, use_cache=True)
    assert len(ours) == len(theirs) and ours[1] is None
    assert type(ours[2]) is type(theirs[2])
    torch.testing.assert_close(ours[0], theirs[0])


def test_gpt2_with_a_user_4d_mask_matches_unpatched():
    # transformers passes a 4-D mask through as the complete mask; a (B, 1, 1, S) one attends bidirectionally.
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config()).eval()
    patched = gptfast.patch(copy.deepcopy(base), backend="reference")
    ids = torch.randint(0, VOCAB, (2, 8))
    mask = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    mask[0, ..., -2:] = False
    torch.testing.assert_close(patched(ids, attention_mask=mask).logits, base(ids, attention_mask=mask).logits)


def test_gpt2_model_matches_unpatched():
    # The bare transformer: no loss, so the hidden states and the gradients of a random projection of them.
    torch.manual_seed(0)
    base = GPT2Model(gpt2_config())
    ids, mask, _ = batch(padding=True)
    upstream = torch.randn(2, 12, 64, dtype=torch.float64)

    def run(model, dtype):
        model.zero_grad(set_to_none=True)
        hidden = model(ids, attention_mask=mask).last_hidden_state
        (hidden * upstream.to(dtype)).sum().backward()
        return hidden.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = run(copy.deepcopy(base).double(), torch.float64)
    torch_out = run(base, torch.float32)
    out = run(gptfast.patch(copy.deepcopy(base), backend="cpu"), torch.float32)
    assert_close(out[0], ref[0], torch_out[0], "last_hidden_state")
    for name, grad in out[1].items():
        assert_close(grad, ref[1][name], torch_out[1][name], f"grad of {name}")


def test_loss_with_num_items_in_batch_matches_unpatched():
    # Gradient accumulation in transformers' Trainer passes num_items_in_batch: a sum divided by it.
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config())
    ids, mask, labels = batch(padding=True)
    expected = base(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    for fused_loss in (False, True):
        patched = gptfast.patch(copy.deepcopy(base), backend="cpu", fused_loss=fused_loss)
        loss = patched(ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_greedy_generation_matches_unpatched():
    # generate() runs the KV cache: a prefill, then one query against all cached keys per step, batched with
    # left padding. Greedy decoding must pick the very same tokens.
    torch.manual_seed(0)
    base = GPT2LMHeadModel(gpt2_config()).eval()
    ids, mask, _ = batch(T=6, padding=True)
    mask[0] = 1  # left padding only, as generation wants it
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    expected = base.generate(ids, **kwargs)
    patched = gptfast.patch(copy.deepcopy(base), backend="cpu")
    assert torch.equal(patched.generate(ids, **kwargs), expected)


def test_attention_dropout_runs_in_training_only():
    torch.manual_seed(0)
    model = gptfast.patch(GPT2LMHeadModel(gpt2_config(attn_pdrop=0.5)), backend="reference")
    ids, _, _ = batch()
    model.train()
    torch.manual_seed(3)
    a = model(ids).logits
    torch.manual_seed(3)
    assert torch.equal(a, model(ids).logits)  # seeded from torch's generator
    assert not torch.equal(a, model(ids).logits)
    model.eval()
    assert torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "fused_loss",
    [
        pytest.param(False, id="cross_entropy", marks=pytest.mark.slow),
        pytest.param(True, id="linear_cross_entropy"),
    ],
)
def test_patched_gpt2_compiles_fullgraph(fused_loss):
    # transformers' GPT-2 traces without graph breaks, and so must what patch puts in: the attention function,
    # the loss function and the fused forward. 4-8 s each: the fused one (attention and the forward that
    # replaces transformers') in the fast suite, the loss_function one slow.
    torch.manual_seed(0)
    model = gptfast.patch(GPT2LMHeadModel(gpt2_config()), backend="cpu", fused_loss=fused_loss)
    ids, mask, labels = batch(padding=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    (loss_c, _, grads_c), (loss_e, _, grads_e) = (_step(fn, ids, mask, labels) for fn in (compiled, model))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[f"_orig_mod.{name}"], grad, rtol=1e-5, atol=1e-6, msg=name)


class _Layer(torch.nn.Module):
    """The attributes of a GPT-2 attention layer that hf_attention reads."""

    def __init__(self, layer_idx=0, scale_by_layer=False):
        super().__init__()
        self.layer_idx, self.scale_attn_weights, self.scale_attn_by_inverse_layer_idx = (
            layer_idx,
            True,
            scale_by_layer,
        )
        self.is_cross_attention, self.gptfast_backend = False, "reference"


@pytest.mark.parametrize(
    "case",
    [
        "padding_float",  # transformers 4.x for a non-sdpa name: (B, 1, 1, S) additive padding, no causality
        "padding_bool",
        "kv_cache",  # L < S queries after cached keys, no mask: causality aligned to the bottom right
        "layer_scaling",  # no `scaling` argument (4.x): 1/sqrt(D) / (layer_idx + 1) from the layer
        "complete_mask",  # masking_utils: a user's (B, 1, 1, S) mask is the whole mask, broadcast over queries
    ],
)
def test_hf_attention_masks_and_scaling_equal_torch(case, monkeypatch):
    import importlib

    from gptfast.patch import hf_attention

    # Which transformers builds the masks: the complete one (masking_utils), or GPT2Model a padding-only one.
    patch_module = importlib.import_module("gptfast.patch")  # gptfast.patch is also the function's name
    monkeypatch.setattr(patch_module, "_masks_built_by_transformers", lambda: case == "complete_mask")

    B, H, L, S, D = 2, 3, 5 if case == "kv_cache" else 7, 7, 16
    q, k, v = torch.randn(B, H, L, D, dtype=torch.float64), *torch.randn(2, B, H, S, D, dtype=torch.float64)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, S - 2 :] = False  # right padding in row 0
    if case != "padding_float":
        # Left padding in row 1 leaves its first queries no key: zeros, in torch as in gptfast, with a bool
        # mask. An additive mask leaves such rows all at finfo.min instead, where torch averages the values
        # and gptfast's backends do not all agree with it, so the float case pads on the right only.
        keep[1, :2] = False
    causal = torch.ones(L, S, dtype=torch.bool).tril(diagonal=S - L)
    full = causal & keep[:, None, None, :]  # (B, 1, L, S): what each query may see
    mask, layer, kwargs = None, _Layer(), {"scaling": D**-0.5}
    if case == "padding_float":
        mask = torch.zeros(B, 1, 1, S, dtype=torch.float64).masked_fill(~keep[:, None, None, :], -1e300)
        full = torch.where(causal, mask, torch.finfo(torch.float64).min)
    elif case == "padding_bool":
        mask = keep[:, None, None, :]
    elif case == "complete_mask":
        mask = keep[:, None, None, :]
        full = mask  # no causality added: the 0.24-off patched logits of a bidirectional mask, before
    elif case == "kv_cache":
        full = causal
    else:
        layer, kwargs = _Layer(layer_idx=2, scale_by_layer=True), {}
        mask = keep[:, None, None, :]
    scale = D**-0.5 / (3 if case == "layer_scaling" else 1)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=full, scale=scale)
    out, weights = hf_attention(layer, q, k, v, mask, **kwargs)
    assert weights is None and out.shape == (B, L, H, D)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------- what patch touches
def test_each_flag_routes_its_part():
    # Naming the cuda backend on CPU tensors fails inside exactly the ops that were routed to gptfast.
    ids, mask, labels = batch()
    with pytest.raises(backends.BackendUnavailable, match="'cuda' cannot run attention"):
        gptfast.patch(GPT2LMHeadModel(gpt2_config()), backend="cuda", cross_entropy=False)(ids, labels=labels)
    with pytest.raises(backends.BackendUnavailable, match="'cuda' cannot run cross_entropy"):
        gptfast.patch(GPT2LMHeadModel(gpt2_config()), backend="cuda", attention=False)(ids, labels=labels)
    with pytest.raises(backends.BackendUnavailable, match="'cuda' cannot run linear_cross_entropy"):
        model = GPT2LMHeadModel(gpt2_config())
        gptfast.patch(model, backend="cuda", attention=False, fused_loss=True)(ids, labels=labels)
    model = gptfast.patch(
        GPT2LMHeadModel(gpt2_config()), backend="cuda", attention=False, cross_entropy=False
    )
    model(ids, labels=labels)  # nothing routed: torch runs it all


def test_only_the_given_instance_changes():
    config = gpt2_config()
    torch.manual_seed(0)
    model, other = GPT2LMHeadModel(config), GPT2LMHeadModel(config)
    assert other.config is config  # transformers shares the config object between them
    ids, _, labels = batch()
    before = other(ids, labels=labels).logits
    gptfast.patch(model, backend="cuda")  # would fail any call that reached gptfast on CPU tensors
    assert config._attn_implementation == "sdpa"
    assert model.config._attn_implementation == "gptfast" and model.config is not config
    assert torch.equal(other(ids, labels=labels).logits, before)
    assert "_loss_function" not in vars(other) and "forward" not in vars(other)


def _instance_state(model):
    """Everything patch may change: instance dicts, submodule identities, configs, the loss function."""
    return (
        [(name, id(m), sorted(vars(m)), id(getattr(m, "config", None))) for name, m in model.named_modules()],
        getattr(model, "loss_function", None),
    )


@pytest.mark.parametrize("fused_loss", [False, True])
def test_unpatch_restores_exactly_and_patching_twice_is_harmless(fused_loss):
    torch.manual_seed(0)
    model = GPT2LMHeadModel(gpt2_config())
    ids, mask, labels = batch(padding=True)
    state, expected = _instance_state(model), model(ids, attention_mask=mask, labels=labels)
    gptfast.patch(model, backend="cpu", fused_loss=fused_loss)
    once = model(ids, attention_mask=mask, labels=labels).loss
    gptfast.patch(model, backend="cpu", fused_loss=fused_loss)
    assert is_patched(model)
    assert torch.equal(model(ids, attention_mask=mask, labels=labels).loss, once)
    assert gptfast.unpatch(model) is model
    assert _instance_state(model) == state
    out = model(ids, attention_mask=mask, labels=labels)
    assert torch.equal(out.logits, expected.logits) and torch.equal(out.loss, expected.loss)
    assert gptfast.unpatch(model) is model and _instance_state(model) == state  # unpatched: a no-op


def test_unpatch_of_an_unpatched_model_is_a_no_op():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Softmax(dim=-1))
    children = list(model.children())
    assert gptfast.unpatch(model) is model and list(model.children()) == children


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own():
    torch.manual_seed(0)
    model = gptfast.patch(GPT2LMHeadModel(gpt2_config()), backend="cpu", fused_loss=True)
    twin = copy.deepcopy(model)
    ids, _, labels = batch()
    torch.testing.assert_close(twin(ids, labels=labels).loss, model(ids, labels=labels).loss)
    gptfast.unpatch(twin)
    assert twin(ids, labels=labels).logits is not None and model(ids, labels=labels).logits is None


# -------------------------------------------------------------------------------------------- bad input
def test_unsupported_models_are_refused_with_the_supported_types():
    with pytest.raises(TypeError, match="GPT2LMHeadModel and GPT2Model.*got str"):
        gptfast.patch("gpt2")
    classifier = GPT2ForSequenceClassification(gpt2_config(pad_token_id=0))
    with pytest.raises(
        TypeError, match=r"unsupported Hugging Face model GPT2ForSequenceClassification.*\.transformer"
    ):
        gptfast.patch(classifier)
    assert not is_patched(classifier)


def test_a_wrapped_hugging_face_model_is_refused():
    # Patching the wrapper changed nothing inside it before, without a word (and marked the inner model).
    model = GPT2LMHeadModel(gpt2_config())
    with pytest.raises(TypeError, match=r"OptimizedModule holds a Hugging Face GPT2LMHeadModel.*before compiling"):
        gptfast.patch(torch.compile(model))
    with pytest.raises(TypeError, match=r"Sequential holds a Hugging Face GPT2LMHeadModel at '0'"):
        gptfast.patch(torch.nn.Sequential(model))
    assert not is_patched(model) and model.config._attn_implementation != "gptfast"


def test_unpatch_keeps_config_changes_made_while_patched():
    # The patched modules share a copy of the config; unpatch handed back the old object, stale.
    model = gptfast.patch(GPT2LMHeadModel(gpt2_config()), backend="reference")
    model.resize_token_embeddings(VOCAB + 3)
    model.config.pad_token_id = 5
    gptfast.unpatch(model)
    assert model.config.vocab_size == VOCAB + 3 and model.config.pad_token_id == 5
    assert model.config._attn_implementation != "gptfast"
    assert all(m.config is model.config for m in model.modules() if hasattr(m, "config"))
    ids = torch.randint(0, VOCAB + 3, (2, 6))
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_a_transformers_without_per_instance_loss_function_is_refused(monkeypatch):
    # As in releases whose loss_function ignores an instance's own: patch says so and changes nothing.
    model = GPT2LMHeadModel(gpt2_config())
    monkeypatch.setattr(GPT2LMHeadModel, "loss_function", property(lambda self: None))
    state = _instance_state(model)
    with pytest.raises(RuntimeError, match="no per-instance GPT2LMHeadModel.loss_function.*fused_loss=True"):
        gptfast.patch(model)
    assert not is_patched(model) and _instance_state(model) == state
    gptfast.patch(model, fused_loss=True)  # the fused loss does not need it


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown gptfast backend 'fast'"):
        gptfast.patch(torch.nn.Softmax(dim=-1), backend="fast")
    with pytest.raises(ValueError, match="fused_loss=True .* needs cross_entropy=True"):
        gptfast.patch(GPT2LMHeadModel(gpt2_config()), fused_loss=True, cross_entropy=False)
    with pytest.raises(ValueError, match="fused_loss=True needs a model with an LM head.*got GPT2Model"):
        gptfast.patch(GPT2Model(gpt2_config()), fused_loss=True)


# ---------------------------------------------------------------------------------- plain module trees
class _Classifier(torch.nn.Module):
    """A model built from torch modules: a softmax gate inside, its loss as a submodule."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.gate = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(dim=-1))
        self.loss = loss

    def forward(self, x, target):
        logits = self.proj(x) * self.gate(x)  # (N, C) or (N, d, C)
        if logits.dim() == 3:
            logits = logits.transpose(1, 2)  # torch's layout for more dims: (N, C, d)
        return self.loss(logits, target)


@pytest.mark.parametrize(
    "loss_kwargs, x_shape, target_shape",
    [
        (dict(label_smoothing=0.1), (6, 8), (6,)),
        (dict(reduction="sum", ignore_index=2), (6, 8), (6,)),
        # (N, C, d) logits: the classes in dim 1, as torch's module wants them and the swapped one keeps them.
        (dict(reduction="none"), (3, 5, 8), (3, 5)),
    ],
)
def test_plain_tree_swaps_softmax_and_cross_entropy(loss_kwargs, x_shape, target_shape):
    torch.manual_seed(0)
    model = _Classifier(torch.nn.CrossEntropyLoss(**loss_kwargs))
    x, target = torch.randn(x_shape), torch.randint(0, 8, target_shape)
    target.view(-1)[1] = 2  # an ignored row where ignore_index=2

    def run(m, dtype):
        m.zero_grad(set_to_none=True)
        xd = x.to(dtype).requires_grad_()
        out = m(xd, target)
        (out * torch.linspace(0.5, 1.5, out.numel(), dtype=dtype).view(out.shape)).sum().backward()
        return out.detach(), xd.grad, {n: p.grad.clone() for n, p in m.named_parameters()}

    ref = run(copy.deepcopy(model).double(), torch.float64)
    torch_out = run(model, torch.float32)
    patched = gptfast.patch(copy.deepcopy(model), backend="cpu")
    assert isinstance(patched.gate[1], gptfast.nn.Softmax) and patched.gate[1].dim == -1
    assert isinstance(patched.loss, gptfast.nn.CrossEntropyLoss)
    assert (patched.loss.ignore_index, patched.loss.reduction, patched.loss.label_smoothing) == (
        model.loss.ignore_index, model.loss.reduction, model.loss.label_smoothing,
    )  # fmt: skip
    out = run(patched, torch.float32)
    assert_close(out[0], ref[0], torch_out[0], "loss")
    assert_close(out[1], ref[1], torch_out[1], "grad of x")
    for name, grad in out[2].items():
        assert_close(grad, ref[2][name], torch_out[2][name], f"grad of {name}")
    gptfast.unpatch(patched)
    assert type(patched.gate[1]) is torch.nn.Softmax and type(patched.loss) is torch.nn.CrossEntropyLoss


def test_plain_tree_leaves_what_gptfast_cannot_represent():
    class ScaledSoftmax(torch.nn.Softmax):
        def forward(self, x):
            return super().forward(2 * x)

    weighted = torch.nn.CrossEntropyLoss(weight=torch.rand(8))
    model = torch.nn.ModuleDict({"w": weighted, "s": ScaledSoftmax(dim=-1), "ok": torch.nn.Softmax(dim=-1)})
    with pytest.warns(UserWarning, match=r"w \(CrossEntropyLoss with per-class weight=\), s \(ScaledSoftmax"):
        gptfast.patch(model)
    assert model["w"] is weighted and type(model["s"]) is ScaledSoftmax
    assert isinstance(model["ok"], gptfast.nn.Softmax)


def test_plain_tree_keeps_the_modules_hooks():
    # A swapped module dropped its hooks before: this loss came out 10x smaller, the softmax unscaled.
    model = torch.nn.ModuleDict({"softmax": torch.nn.Softmax(dim=-1), "loss": torch.nn.CrossEntropyLoss()})
    x, t = torch.randn(3, 5), torch.randint(0, 5, (3,))
    halve = model["softmax"].register_forward_pre_hook(lambda module, args: (args[0] / 2,))
    model["loss"].register_forward_hook(lambda module, args, out: out * 10)
    before = model["softmax"](x), model["loss"](x, t)
    gptfast.patch(model, backend="reference")
    assert isinstance(model["softmax"], gptfast.nn.Softmax)
    after = model["softmax"](x), model["loss"](x, t)
    torch.testing.assert_close(after[0], before[0])
    torch.testing.assert_close(after[1], before[1])
    halve.remove()  # the user's handle still works on the replacement
    torch.testing.assert_close(model["softmax"](x), x.softmax(-1))


def test_plain_tree_flags_and_training_mode():
    model = torch.nn.Sequential(torch.nn.Softmax(dim=-1), torch.nn.CrossEntropyLoss()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        gptfast.patch(model, softmax=False)
    assert type(model[0]) is torch.nn.Softmax and isinstance(model[1], gptfast.nn.CrossEntropyLoss)
    assert not model[1].training  # the replacement keeps the mode
    gptfast.patch(model, cross_entropy=False)  # re-patching starts from the original
    assert isinstance(model[0], gptfast.nn.Softmax) and type(model[1]) is torch.nn.CrossEntropyLoss


# ------------------------------------------------------------------------------------------------- GPU
GPU_BACKENDS = sorted({b for b, d in cases("attention") if d == "cuda"} - {"reference"}) or ["triton", "cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("fused_loss", [False, True], ids=["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpt2_matches_unpatched_on_gpu(backend, fused_loss):
    # bf16 with head dim 64: what every CUDA attention kernel takes (the cuda one also wants no mask, so the
    # padded case runs on triton only). The reference is the unpatched model in fp32.
    config = dict(n_embd=128, n_head=2)
    check_parity(backend, "cuda", torch.bfloat16, fused_loss=fused_loss, **config)
    if backend == "triton":
        check_parity(backend, "cuda", torch.bfloat16, padding=True, fused_loss=fused_loss, **config)
