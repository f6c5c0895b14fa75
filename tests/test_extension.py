"""The C++ extension builds, loads, and declares exactly the schemas the Python backends use."""
import os

import pytest
import torch

from gptfast.ops.schemas import SCHEMAS

pytestmark = pytest.mark.skipif(
    os.environ.get("GPTFAST_SKIP_EXT") == "1", reason="installed with GPTFAST_SKIP_EXT=1 (no extension)"
)


def test_extension_loads():
    import gptfast._C  # noqa: F401  (fails the test when `make` did not build it)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_cpp_schema_equals_python_schema(name):
    import gptfast._C  # noqa: F401

    schema = str(getattr(torch.ops.gptfast, name).default._schema)
    assert schema == f"gptfast::{name}{SCHEMAS[name]}"
