"""Which backends each op's tests run on this machine: every one that can run here, on CPU and CUDA."""
import torch

from gptfast import backends


def cases(op: str) -> list[tuple[str, str]]:
    """(backend, device) pairs that can run `op` here; reference always, triton via the interpreter on CPU."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out = []
    for device in devices:
        for name in backends.NAMES:
            if name == "triton" and device == "cpu" and torch.cuda.is_available():
                continue  # on a GPU machine the interpreter is not set; triton is tested on CUDA there
            if backends.why_not(name, op, torch.device(device)) is None:
                out.append((name, device))
    return out


def ids(cases_list):
    return [f"{b}-{d}" for b, d in cases_list]


def assert_compiles_like_eager(fn, x):
    """torch.compile(fn, fullgraph=True, backend="aot_eager") gives fn's value and gradient with respect to x."""
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_e, out_c = fn(xe), compiled(xc)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(xc.grad, xe.grad)
