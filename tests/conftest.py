import os

import pytest
import torch

# The Triton kernels run on CPU tensors only under the interpreter, and triton reads this when a kernel is
# decorated, so it must be set before anything imports triton. A CUDA machine runs the real kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the GPU machine may lack it; tests/test_properties.py then skips
    settings = None
if settings is not None:
    # tests/test_properties.py scales its examples per op from these. "ci" (the default) is bounded and
    # derandomized, so make test sees the same examples every run; "long" (--hypothesis-profile=long) draws
    # fresh ones, thousands over the file.
    _common = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("ci", max_examples=12, derandomize=True, **_common)
    settings.register_profile("long", max_examples=500, print_blob=True, **_common)
    settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow (CI full mode)")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _one_triton_config(monkeypatch):
    # On a GPU, Triton attention and softmax autotune several configs for every new dtype and shape bucket
    # (and attention's causal/mask/dropout combination): seconds of compiling each, minutes over suites that
    # sweep many combinations. These tests check the default (first) config; the GPU tests that run every
    # candidate unset this themselves, and the benchmarks autotune. (The interpreter always runs one config.)
    # The setting reaches the subprocesses the tests start.
    monkeypatch.setenv("GPTFAST_AUTOTUNE", "0")


@pytest.fixture(scope="session")
def word_corpus(tmp_path_factory):
    """word_corpus(n) -> the path of a text of n words drawn (seed 0) from a small Python-ish vocabulary, one
    file per n for the session: what the training tests learn from in a few steps."""
    made = {}

    def make(n_words: int) -> str:
        if n_words not in made:
            path = tmp_path_factory.mktemp("data") / "corpus.txt"
            g = torch.Generator().manual_seed(0)
            words = ["alpha", "beta", "gamma", "delta", "def", "return", "\n", "    ", "(x)", ":"]
            picks = torch.randint(0, len(words), (n_words,), generator=g).tolist()
            path.write_text(" ".join(words[i] for i in picks))
            made[n_words] = str(path)
        return made[n_words]

    return make


@pytest.fixture
def single_thread():
    """One intra-op thread for suites of many tiny ops: on a loaded 2-core machine each op with two threads
    waits milliseconds for the second one (10-30 ms for a 4 x 9 cross-entropy, against 0.01 ms with one
    thread). Only the cpu attention backward's results depend on the thread count (it picks a fused or a
    split parallel decomposition by it; both are checked against the reference in test_cpu_backend.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
