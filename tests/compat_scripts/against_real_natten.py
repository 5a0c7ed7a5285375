"""Compare nattn.compat.natten with a real NATTEN (0.20+) installed in the same environment:
functional calls with stride, dilation, causal axes and additional tokens, plain attention,
merge_attentions, and the modules with one shared state_dict. Run by tests/test_compat.py in a
subprocess when `import natten` finds a real NATTEN; prints OK on success."""

import warnings

import torch

import natten as real
from nattn.compat import natten as ours

warnings.filterwarnings("ignore")
assert not getattr(real, "__nattn_compat__", False), "this must be a real NATTEN"
torch.manual_seed(0)
TOL = dict(rtol=1e-4, atol=2e-5)  # fp32; NATTEN runs its Flex backend here


def close(a, b, what):
    torch.testing.assert_close(a, b, **TOL, msg=what)


cases = [
    ((13,), dict(kernel_size=4, stride=2, dilation=3, is_causal=False)),
    ((16,), dict(kernel_size=5, stride=1, dilation=2, is_causal=True)),
    ((9, 10), dict(kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True))),
    ((8, 9), dict(kernel_size=(4, 4), stride=(4, 4), dilation=1, is_causal=False)),
    ((4, 6, 6), dict(kernel_size=(2, 3, 3), stride=(1, 1, 2), dilation=(1, 2, 1),
                     is_causal=(True, False, False))),
]
for spatial, kw in cases:
    r = len(spatial)
    q, k, v = (torch.randn(2, *spatial, 2, 16) for _ in range(3))
    fn_real, fn_ours = getattr(real, f"na{r}d"), getattr(ours, f"na{r}d")
    o_real, l_real = fn_real(q, k, v, return_lse=True, **kw)
    o_ours, l_ours = fn_ours(q, k, v, return_lse=True, **kw)
    close(o_ours, o_real, f"na{r}d {spatial} {kw}")
    close(l_ours, l_real, f"na{r}d lse {spatial} {kw}")

q, k, v = (torch.randn(1, 7, 8, 2, 16) for _ in range(3))
ak, av = torch.randn(1, 5, 2, 16), torch.randn(1, 5, 2, 16)
close(ours.na2d(q, k, v, 3, additional_keys=ak, additional_values=av),
      real.na2d(q, k, v, 3, additional_keys=ak, additional_values=av), "additional tokens")

q, k, v = (torch.randn(2, 12, 2, 16) for _ in range(3))
for causal in (False, True):
    try:  # NATTEN has no FMHA backend for CPU tensors; then only the NA comparisons count
        want = real.attention(q, k, v, is_causal=causal)
    except NotImplementedError:
        print(f"real natten.attention(is_causal={causal}) cannot run here: not compared")
        continue
    close(ours.attention(q, k, v, is_causal=causal), want, f"attention causal={causal}")

o1, l1 = ours.attention(q, k, v, return_lse=True)
o2, l2 = ours.attention(q, v, k, return_lse=True)
m_ours = ours.merge_attentions([o1, o2], [l1, l2])
m_real = real.merge_attentions([o1.contiguous(), o2.contiguous()], [l1, l2],
                               torch_compile=False, use_autograd_fix=False)
close(m_ours[0], m_real[0], "merge out")
close(m_ours[1].float(), m_real[1].float(), "merge lse")

for r, spatial, args in ((1, (20,), (32, 2, 5, 1, 3)), (2, (14, 15), (64, 4, 7, 1, 2)),
                         (3, (4, 8, 8), (32, 2, (2, 3, 3), (1, 2, 1), 1))):
    m_real = getattr(real, f"NeighborhoodAttention{r}D")(*args)
    m_ours = getattr(ours, f"NeighborhoodAttention{r}D")(*args)
    m_ours.load_state_dict(m_real.state_dict(), strict=True)
    x = torch.randn(1, *spatial, args[0])
    with torch.no_grad():  # Flex has no CPU backward
        close(m_ours(x), m_real(x), f"NeighborhoodAttention{r}D{args}")
print("OK")
