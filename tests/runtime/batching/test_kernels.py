"""The engine's products: every row's bits independent of how many rows are computed with it (in
each dtype, as this machine's kernels compute them), prompts at a kernel at least as exact as the
load dtype's, and prompt attention whose rows do not depend on where the prompt was cut."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from optdemo.runtime.batching import kernels
from optdemo.runtime.batching.exact_attention import KEY_BLOCK, QUERY_BLOCK, block_attention

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EXACT = kernels.KernelChoice(kernels.NATIVE, True, "")
FLOAT32_PROMPTS = kernels.KernelChoice(kernels.FLOAT32, True, "")


def _linear(x: torch.Tensor, weight: torch.Tensor, mode: str, choice: kernels.KernelChoice) -> torch.Tensor:
    with torch.inference_mode(), kernels.computing(mode, choice):
        return torch.nn.functional.linear(x, weight)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", [kernels.STEP, kernels.PROMPT])
def test_a_rows_bits_do_not_depend_on_its_company(dtype: torch.dtype, mode: str) -> None:
    """Rows computed 1 to 20 at a time, at any offset, have exactly the bits they have among 96."""
    torch.manual_seed(0)
    weight = (torch.randn(384, 256) / 16).to(dtype)
    x = torch.randn(96, 256).to(dtype)
    choice = FLOAT32_PROMPTS if dtype == torch.float16 else EXACT
    everything = _linear(x, weight, mode, choice)
    for rows in range(1, 21):
        for start in (0, 5, 61):
            part = _linear(x[start : start + rows], weight, mode, choice)
            assert torch.equal(part, everything[start : start + rows]), (rows, start)


def test_the_probe_finds_what_padding_fixes() -> None:
    """The rules the probe measures: every count it calls safe gives canonical rows, and padding
    picks the fewest such rows (torch's own float32 and bfloat16 kernels round some counts apart
    here; float16's computes row by row)."""
    rule = kernels.probe_rows(kernels.NATIVE, torch.float16)
    assert rule.exact
    for dtype in DTYPES:
        rule = kernels.probe_rows(kernels.NATIVE, dtype)
        assert rule.exact, dtype
        for rows in range(1, kernels.PROBE_ROWS + 1):
            padded = rule.padded(rows)
            assert padded >= rows and (padded in rule.safe or padded > kernels.PROBE_ROWS)
        assert rule.padded(kernels.PROBE_ROWS + 7) == kernels.PROBE_ROWS + 7


def test_outside_the_engine_torch_computes_as_it_always_does() -> None:
    """The patched product is torch's own for any other thread and outside ``computing``."""
    torch.manual_seed(0)
    weight, x = torch.randn(64, 32), torch.randn(3, 32)
    original = kernels._original_linear or torch.nn.functional.linear
    with kernels.computing(kernels.PROMPT, EXACT):
        seen: list[torch.Tensor] = []
        other = threading.Thread(target=lambda: seen.append(torch.nn.functional.linear(x, weight)))
        other.start()
        other.join()
    assert torch.equal(seen[0], original(x, weight))
    assert torch.equal(torch.nn.functional.linear(x, weight), original(x, weight))
    assert kernels.current_mode() is None


def test_float16_prompts_in_float32_are_at_least_as_exact_as_float16() -> None:
    """Against a float64 reference, float16 weights computed in float32 blocks err no more than
    float16's own product, and round once: their results are float32 products rounded to float16
    (the whole product's, to within one float16 step: a float32 product's last bits depend on how
    the CPU's library blocks it, e.g. Intel's MKL against AMD's)."""
    torch.manual_seed(0)
    weight = (torch.randn(2048, 1024) / 32).half()
    x = torch.randn(40, 1024).half()
    reference = x.double() @ weight.double().T
    native = _linear(x, weight, kernels.PROMPT, EXACT)
    in_float32 = _linear(x, weight, kernels.PROMPT, FLOAT32_PROMPTS)
    assert in_float32.dtype == torch.float16
    assert (in_float32.double() - reference).abs().max() <= (native.double() - reference).abs().max()
    whole = (x.float() @ weight.float().T).half().float()
    # One float16 step, or (where the sum cancels to near zero) a float32 sum's own error.
    torch.testing.assert_close(in_float32.float(), whole, rtol=2**-10, atol=2**-18)
    assert (in_float32.float() == whole).float().mean() > 0.99


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_prompt_attention_rows_do_not_depend_on_the_cut(dtype: torch.dtype) -> None:
    """A prompt over two and a half key blocks computed whole, or after any number of cached
    tokens (block edges included): the same bits for every row, and the same values as SDPA's
    causal attention (to its rounding)."""
    torch.manual_seed(0)
    heads, total, dim = 2, 2 * KEY_BLOCK + KEY_BLOCK // 2, 16
    q, k, v = (torch.randn(1, heads, total, dim).to(dtype) for _ in range(3))
    whole = block_attention(q, k, v)
    edges = (QUERY_BLOCK - 1, QUERY_BLOCK, KEY_BLOCK - 1, KEY_BLOCK, KEY_BLOCK + 1, 2 * KEY_BLOCK + 3)
    for cached in (1, 65, 200, *edges, total - 1):
        part = block_attention(q[:, :, cached:], k, v)
        assert torch.equal(part, whole[:, cached:]), cached
    for prefix in (10, QUERY_BLOCK, 129, KEY_BLOCK + 7):  # a shorter prompt's rows, computed first
        assert torch.equal(
            block_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix]), whole[:, :prefix]
        )

    class Attention(torch.nn.Module):
        is_causal = True

    stock, _ = sdpa_attention_forward(Attention(), q, k, v, None)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    assert (whole.float() - stock.float()).abs().max() <= tolerance
