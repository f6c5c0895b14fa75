"""The GPT: shapes, learning, positional encodings, tied head, fused loss, init, KV-cache decoding, errors."""

import math

import pytest
import torch

import gptfast
from gptfast import GPT, GPTConfig, backends, ops
from gptfast.model import SINUSOIDAL_SCALE, sinusoidal_positions
from backends_under_test import cases

# Small enough to run in milliseconds, large enough to have several heads and layers.
SMALL = dict(vocab_size=61, block_size=24, n_layer=2, n_head=2, n_embd=32)


def small(**overrides) -> GPT:
    return GPT(GPTConfig(**{**SMALL, **overrides}))


def tokens(B, T, vocab=SMALL["vocab_size"]):
    return torch.randint(0, vocab, (B, T))


# ------------------------------------------------------------------------------------------- config
def test_presets():
    tiny = GPTConfig.preset("tiny")
    assert (tiny.vocab_size, tiny.block_size, tiny.n_layer, tiny.n_head, tiny.n_embd) == (256, 128, 4, 4, 128)
    gpt2 = GPTConfig.preset("gpt2", dropout=0.1)
    assert (gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.dropout) == (12, 12, 768, 0.1)
    assert GPTConfig.preset("gpt2-medium").n_layer == 24
    with pytest.raises(ValueError, match="unknown preset 'gpt3'.*tiny"):
        GPTConfig.preset("gpt3")


def test_gpt2_preset_has_124m_parameters():
    # The meta device builds the 124M model without allocating it.
    with torch.device("meta"):
        model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_parameters(non_embedding=False) == 124_439_808  # GPT-2 small with its tied head


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(n_embd=30, n_head=4), "multiple of n_head"),
        (dict(n_layer=0), "n_layer must be a positive int"),
        (dict(pos_encoding="rotary"), "pos_encoding must be one of"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(backend="fastest"), "unknown gptfast backend 'fastest'"),
    ],
)
def test_config_rejects_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**{**SMALL, **bad})


# ------------------------------------------------------------------------------------------ forward
def test_forward_shapes():
    model = small()
    idx = tokens(3, 7)  # T < block_size: any length up to it works
    logits, loss = model(idx)
    assert logits.shape == (3, 7, SMALL["vocab_size"]) and loss is None
    logits, loss = model(idx, tokens(3, 7))
    assert logits.shape == (3, 7, SMALL["vocab_size"]) and loss.shape == ()
    # An untrained model is close to uniform: the loss starts near log(V).
    assert abs(loss.item() - math.log(SMALL["vocab_size"])) < 0.5


def test_overfits_a_tiny_batch():
    model = small(dropout=0.0)
    idx, targets = tokens(4, 16), tokens(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        _, loss = model(idx, targets)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.25 * first, (first, loss.item())


def test_int32_tokens_give_the_same_result():
    model = small()
    idx = tokens(2, 9)
    torch.testing.assert_close(model(idx.int())[0], model(idx)[0], rtol=0, atol=0)


# ------------------------------------------------------------------------------- positional encoding
@pytest.mark.parametrize("length, dim", [(24, 32), (5, 7)])  # an even and an odd model width
def test_sinusoidal_positions_equal_the_formula(length, dim):
    pe = sinusoidal_positions(length, dim)
    expected = torch.empty(length, dim)
    for pos in range(length):
        for j in range(dim):
            i = j // 2
            angle = pos / 10000 ** (2 * i / dim)
            expected[pos, j] = math.sin(angle) if j % 2 == 0 else math.cos(angle)
    torch.testing.assert_close(pe, expected, rtol=0, atol=1e-6)


def test_sinusoidal_model_adds_the_fixed_buffer():
    model = small().eval()
    idx = tokens(2, 10)
    x = model._embed(idx, None, start=0)
    torch.testing.assert_close(model.pe, sinusoidal_positions(24, 32), rtol=0, atol=0)
    expected = model.wte(idx) + SINUSOIDAL_SCALE * sinusoidal_positions(24, 32)[:10]  # (B, T, C) + (T, C)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    names = dict(model.named_parameters())
    assert (
        "wpe.weight" not in names and "pe" not in model.state_dict()
    )  # fixed: rebuilt, never trained or saved


def test_learned_positions_are_trained():
    model = small(pos_encoding="learned")
    assert model.wpe.weight.shape == (SMALL["block_size"], SMALL["n_embd"]) and model.wpe.weight.requires_grad
    idx = tokens(2, 10)
    _, loss = model(idx, tokens(2, 10))
    loss.backward()
    grad = model.wpe.weight.grad
    assert grad[:10].abs().sum() > 0 and grad[10:].abs().sum() == 0  # only the positions that were used
    before = model(idx)[0]
    with torch.no_grad():
        model.wpe.weight[3] += 1.0
    after = model(idx)[0]
    assert torch.equal(before[:, :3], after[:, :3]) and not torch.equal(before[:, 3:], after[:, 3:])  # causal


# --------------------------------------------------------------------------------- head, loss, init
def test_head_is_tied_to_the_token_embedding():
    model = small()
    assert model.lm_head.weight is model.wte.weight
    n_unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert model.num_parameters() == n_unique
    assert len([p for p in model.parameters() if p.shape == (SMALL["vocab_size"], SMALL["n_embd"])]) == 1


@pytest.mark.parametrize("pos_encoding", ["sinusoidal", "learned"])
def test_fused_loss_equals_unfused(pos_encoding):
    unfused = small(pos_encoding=pos_encoding)
    fused = small(pos_encoding=pos_encoding, fused_loss=True)
    fused.load_state_dict(unfused.state_dict())
    idx, targets = tokens(3, 11), tokens(3, 11)
    targets[0, :4] = -100  # ignored positions must drop out of both the sum and the count
    logits_u, loss_u = unfused(idx, targets)
    logits_f, loss_f = fused(idx, targets)
    assert logits_f is None and logits_u is not None  # fused never materialises the logits
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-6, atol=1e-6)
    loss_u.backward()
    loss_f.backward()
    grads_f = dict(fused.named_parameters())
    for name, p in unfused.named_parameters():
        torch.testing.assert_close(grads_f[name].grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # Without targets the fused model still returns logits, for sampling.
    assert fused(idx)[0].shape == (3, 11, SMALL["vocab_size"])


def test_gpt2_init():
    torch.manual_seed(1)
    n_layer = 4
    model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=n_layer, n_head=4, n_embd=256))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            expected = 0.02 / math.sqrt(2 * n_layer)  # residual projections, scaled for depth
        elif p.dim() == 2:
            expected = 0.02  # other Linear layers and the (tied) embedding
        elif "ln" in name and name.endswith("weight"):
            assert torch.all(p == 1), name
            continue
        else:
            assert torch.all(p == 0), name  # biases (Linear and LayerNorm)
            continue
        assert abs(p.std().item() - expected) < 0.05 * expected, (name, p.std().item(), expected)
        assert abs(p.mean().item()) < 0.1 * expected, name


def test_dropout_only_in_training():
    model = small(dropout=0.2)
    idx = tokens(2, 12)
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_config_backend_reaches_every_op(monkeypatch):
    seen = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, kwargs.get("backend")))
            return fn(*args, **kwargs)

        monkeypatch.setattr(ops, name, wrapped)

    for name in ("scaled_dot_product_attention", "cross_entropy", "linear_cross_entropy", "softmax"):
        spy(name, getattr(ops, name))
    for fused in (False, True):
        model = small(backend="reference", fused_loss=fused)
        model(tokens(2, 5), tokens(2, 5))[1].backward()
        model.generate(tokens(1, 3), 2)
    called = {name for name, _ in seen}
    assert called == {"scaled_dot_product_attention", "cross_entropy", "linear_cross_entropy", "softmax"}
    assert all(backend == "reference" for _, backend in seen), seen


def test_unavailable_backend_is_refused():
    model = small(backend="cuda")  # never runnable on CPU tensors
    with pytest.raises(backends.BackendUnavailable, match="'cuda'"):
        model(tokens(1, 4))


# ------------------------------------------------------------------------------------------ prefix
def test_prefix_embeds_continue_positions_and_attention():
    # A prefix equal to the first P tokens' embeddings must give exactly the logits of the full sequence.
    model = small().eval()
    idx = tokens(2, 15)
    P = 6
    full, _ = model(idx)
    prefix = model.wte(idx[:, :P]).detach()
    logits, _ = model(idx[:, P:], prefix_embeds=prefix)
    assert logits.shape == (2, 15 - P, SMALL["vocab_size"])
    torch.testing.assert_close(logits, full[:, P:], rtol=1e-5, atol=1e-5)
    # The loss covers the text positions only, as if the prefix's targets were ignore_index.
    targets = tokens(2, 15)
    _, loss = model(idx[:, P:], targets[:, P:], prefix_embeds=prefix)
    masked = targets.clone()
    masked[:, :P] = -100
    _, loss_full = model(idx, masked)
    torch.testing.assert_close(loss, loss_full, rtol=1e-5, atol=1e-6)


def test_prefix_embeds_get_gradients():
    model = small()
    prefix = torch.randn(2, 4, SMALL["n_embd"], requires_grad=True)
    _, loss = model(tokens(2, 5), tokens(2, 5), prefix_embeds=prefix)
    loss.backward()
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0


# -------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, None), (0.9, 5)])  # greedy, sampled, top-k
def test_cached_generation_equals_uncached(temperature, top_k):
    model = small()
    prompt = tokens(2, 5)
    # 30 new tokens pass block_size (24): the window slides, the cache must re-encode it.
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        outs.append(model.generate(prompt, 30, temperature=temperature, top_k=top_k, use_cache=use_cache))
    assert outs[0].shape == (2, 35)
    assert torch.equal(outs[0][:, :5], prompt)
    assert torch.equal(outs[0], outs[1])


def test_cached_generation_with_prefix_equals_uncached():
    model = small()
    prefix = torch.randn(2, 7, SMALL["n_embd"])
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        outs.append(model.generate(tokens(2, 2), 25, prefix_embeds=prefix, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])


def test_cached_logits_equal_full_forward():
    # Token equality could hide small cache errors; the per-step logits must match the full forward too.
    model = small().eval()
    idx = tokens(2, 20)
    full, _ = model(idx)
    caches = [gptfast.nn.KVCache(SMALL["block_size"]) for _ in model.blocks]
    steps = [model._next_logits(idx[:, :8], None, caches)]  # prefill 8, then one token at a time
    for t in range(9, 21):
        steps.append(model._next_logits(idx[:, :t], None, caches))
    torch.testing.assert_close(torch.stack(steps, dim=1), full[:, 7:], rtol=1e-5, atol=1e-5)


def test_top_k_1_is_greedy_and_generate_restores_mode():
    model = small(dropout=0.1)
    prompt = tokens(1, 4)
    greedy = model.generate(prompt, 10, temperature=0.0)
    assert model.training  # put back in training mode afterwards
    assert torch.equal(model.generate(prompt, 10, temperature=1.5, top_k=1), greedy)


@pytest.mark.parametrize("temperature", [1e-30, 1e-320])  # logits / T overflowed; 1e-320 is 0 in fp32
def test_a_tiny_temperature_samples_the_greedy_tokens(temperature):
    # Its limit is the argmax: it raised multinomial's "inf, nan or element < 0" before.
    model = small()
    prompt = tokens(2, 4)
    greedy = model.generate(prompt, 8, temperature=0.0)
    assert torch.equal(model.generate(prompt, 8, temperature=temperature), greedy)


# -------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "make_idx, error, match",
    [
        (lambda: tokens(1, 25), ValueError, "exceeds block_size 24"),
        (lambda: torch.rand(1, 5), TypeError, "int64 or int32"),
        (lambda: tokens(1, 5)[0], ValueError, r"\(batch, seq_len\)"),
        (lambda: torch.tensor([[1, 61]]), ValueError, r"token ids must be in \[0, 61\)"),
        (lambda: [[1, 2]], TypeError, "got list"),
    ],
)
def test_bad_idx(make_idx, error, match):
    with pytest.raises(error, match=match):
        small()(make_idx())


def test_bad_targets_and_prefix():
    model = small()
    with pytest.raises(ValueError, match="targets must have idx's shape"):
        model(tokens(2, 5), tokens(2, 4))
    with pytest.raises(ValueError, match=r"prefix_embeds must be \(B, P, n_embd\) = \(2, P, 32\)"):
        model(tokens(2, 5), prefix_embeds=torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"prefix \(20\) \+ idx \(5\) exceeds block_size 24"):
        model(tokens(2, 5), prefix_embeds=torch.randn(2, 20, 32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0"),
        (dict(max_new_tokens=3, temperature=-0.5), "temperature must be a number >= 0"),
        (dict(max_new_tokens=3, top_k=0), "top_k must be a positive int"),
    ],
)
def test_bad_generate_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small().generate(tokens(1, 3), **kwargs)
    with pytest.raises(ValueError, match="at least one token"):
        small().generate(tokens(1, 0), 2, prefix_embeds=torch.randn(1, 3, 32))
    with pytest.raises(ValueError, match="input is empty"):
        small()(tokens(1, 0))


# ------------------------------------------------------------------------------------------- compile
# Every backend that runs all of the model's ops on CPU tensors here (triton through the interpreter).
MODEL_OPS = ("attention", "cross_entropy", "linear_cross_entropy")
MODEL_BACKENDS = sorted(set.intersection(*({b for b, d in cases(op) if d == "cpu"} for op in MODEL_OPS)))


def _compiled_and_eager_step(model, compiled, idx, targets):
    """(loss, parameter gradients) of one training step through `compiled`, then through eager `model`."""
    results = []
    for fn in (compiled, model):
        model.zero_grad()
        torch.manual_seed(4)
        _, loss = fn(idx, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


def _compile_cases():
    # Triton's cases take ~5 s each under the interpreter: the fused-loss one is fast-suite, the other slow.
    return [
        pytest.param(b, fused, marks=[pytest.mark.slow] if b == "triton" and not fused else [])
        for b in MODEL_BACKENDS
        for fused in (False, True)
    ]


@pytest.mark.parametrize("backend, fused_loss", _compile_cases())
def test_compiles_fullgraph_and_matches_eager(backend, fused_loss):
    # Dropout on where the backend has it (the cpu attention kernel has none): the compiled step must draw the
    # same masks from the same seed, with no graph break.
    dropout = 0.0 if backends.why_not(backend, "attention", torch.device("cpu"), dropout=True) else 0.1
    model = small(dropout=dropout, fused_loss=fused_loss, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    idx, targets = tokens(2, 9), tokens(2, 9)
    (loss_c, grads_c), (loss_e, grads_e) = _compiled_and_eager_step(model, compiled, idx, targets)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_tiny_preset_training_step_compiles_with_inductor():
    # Inductor once, on the automatic backend choice; slow, as compiling the 4-layer forward and backward
    # takes 40-75 s on 2 cores. Inductor fuses and reorders the torch ops around gptfast's, so the last bits
    # may move: fp32 rounding-level tolerances.
    model = GPT(GPTConfig.preset("tiny"))
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    vocab = model.config.vocab_size
    (loss_c, grads_c), (loss_e, grads_e) = _compiled_and_eager_step(
        model, compiled, tokens(2, 32, vocab), tokens(2, 32, vocab)
    )
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)
