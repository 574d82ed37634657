"""captioner.models.linear: oneDNN for CPU inference (float32 from two rows, bfloat16), F.linear elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from captioner.models import linear as linear_module
from captioner.models.linear import Linear, linear, onednn_linear

pytestmark = pytest.mark.skipif(not linear_module._ONEDNN, reason="this torch build has no oneDNN")


@pytest.fixture
def onednn_calls(monkeypatch) -> list[tuple[int, ...]]:
    """Shapes of the inputs that reached oneDNN's linear."""
    calls: list[tuple[int, ...]] = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            if name != "_linear_pointwise":
                return getattr(torch.ops.mkldnn, name)
            return lambda x, *a: calls.append(tuple(x.shape)) or real(x, *a)

    monkeypatch.setattr(linear_module.torch.ops, "mkldnn", Spy(), raising=False)
    return calls


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_path_equals_f_linear(onednn_calls, gelu: bool, bias: bool) -> None:
    torch.manual_seed(0)
    w, b = torch.randn(48, 32), (torch.randn(48) if bias else None)
    x = torch.randn(3, 5, 32)
    strided = torch.randn(5, 3, 32).transpose(0, 1)  # not contiguous
    with torch.inference_mode():
        for inp in (x, strided, x[0]):
            reference = F.linear(inp, w, b)
            reference = F.gelu(reference) if gelu else reference
            torch.testing.assert_close(linear(inp, w, b, gelu=gelu), reference, rtol=1e-5, atol=1e-5)
    assert onednn_calls == [(3, 5, 32), (3, 5, 32), (5, 32)]


def test_bfloat16_inference_takes_onednn_with_gelu_fused(onednn_calls) -> None:
    torch.manual_seed(0)
    w, b, x = torch.randn(48, 32).bfloat16(), torch.randn(48).bfloat16(), torch.randn(1, 32).bfloat16()
    with torch.inference_mode():
        fused = linear(x, w, b, gelu=True)  # one row too: in bf16 both kernels are oneDNN's
    reference = F.gelu(F.linear(x.float(), w.float(), b.float()))
    assert fused.dtype == torch.bfloat16 and onednn_calls == [(1, 32)]
    torch.testing.assert_close(fused.float(), reference, rtol=2e-2, atol=2e-2)


def test_only_inference_outside_autocast_takes_onednn(onednn_calls) -> None:
    torch.manual_seed(0)
    layer = Linear(8, 4)
    rows = torch.randn(6, 8)
    out = layer(rows)  # autograd records the weights' gradient: plain F.linear
    out.sum().backward()
    assert layer.weight.grad is not None
    with torch.inference_mode():
        layer(torch.randn(1, 8))  # one row: MKL's matrix-vector product is the faster one
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(rows).dtype == torch.bfloat16  # autocast keeps its say
        with onednn_linear(False):
            layer(rows)
        assert onednn_calls == []
        layer(rows)
    with torch.no_grad():
        layer(rows)
    assert onednn_calls == [(6, 8), (6, 8)]


def test_linear_keeps_nn_linear_parameters_and_state_dict() -> None:
    plain, ours = torch.nn.Linear(8, 4), Linear(8, 4)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, torch.nn.Linear) and list(ours.state_dict()) == ["weight", "bias"]
    with torch.inference_mode():
        x = torch.randn(7, 8)
        torch.testing.assert_close(ours(x), plain(x), rtol=1e-5, atol=1e-5)
