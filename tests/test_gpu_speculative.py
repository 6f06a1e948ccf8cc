"""Tree attention, verification and KV compaction on a CUDA GPU: every kernel backend against the reference
(bfloat16 included, which the interpreter cannot check), long prefixes, GQA, ragged batches, and CUDA-graph
capture of tree_attention and compact_kv. Run with ``pytest -m gpu``."""

import pytest
import torch

import efficient_ops as eo
from efficient_ops.reference import speculative as reference

from conftest import gpu_kernel_backends, rel_err

pytestmark = pytest.mark.gpu
DTYPES = (torch.float16, torch.bfloat16)


def random_parents(b, t, g):
    rows = [[-1] + [int(torch.randint(0, i, (), generator=g)) for i in range(1, t)] for _ in range(b)]
    return torch.tensor(rows, device="cuda")


def inputs(b, hq, hkv, t, d, s_max, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to("cuda", dtype)
               for h, n in ((hq, t), (hkv, s_max), (hkv, s_max)))
    return q, k, v, random_parents(b, t, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b, hq, hkv, t, d, prefix", [
    (1, 32, 8, 64, 128, [4096]), (3, 8, 2, 17, 64, [0, 1, 3001]), (2, 4, 4, 128, 128, [777, 16384]),
    (1, 2, 1, 256, 64, [100]), (4, 32, 8, 1, 128, [5, 0, 64, 65])])
def test_tree_attention_backends_match_reference(dtype, b, hq, hkv, t, d, prefix, poison_outputs):
    prefix_lens = torch.tensor(prefix, device="cuda")
    q, k, v, parents = inputs(b, hq, hkv, t, d, max(prefix) + t + 5, dtype, seed=t + d)
    ref = eo.tree_attention(q, k, v, prefix_lens, parents, backend="reference")
    for backend in gpu_kernel_backends():
        out = eo.tree_attention(q, k, v, prefix_lens, parents, backend=backend)
        assert rel_err(out, ref) < 1e-2, backend


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_tree_attention_graph_capture(backend):
    if backend not in gpu_kernel_backends():
        pytest.skip(f"{backend} unavailable")
    q, k, v, parents = inputs(2, 8, 2, 16, 128, 5000, torch.bfloat16, seed=0)
    prefix_lens = torch.tensor([4000, 123], device="cuda")
    eager = eo.tree_attention(q, k, v, prefix_lens, parents, backend=backend)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = eo.tree_attention(q, k, v, prefix_lens, parents, backend=backend)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    prefix_lens.copy_(torch.tensor([100, 4900], device="cuda"))  # new lengths, same graph
    graph.replay()
    assert rel_err(out, eo.tree_attention(q, k, v, prefix_lens, parents, backend="reference")) < 1e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compact_kv_backends_and_graph_capture(dtype):
    g = torch.Generator().manual_seed(1)
    k = torch.randn(4, 3, 8, 300, 128, generator=g).to("cuda", dtype)
    v = torch.randn(4, 3, 8, 300, 128, generator=g).to("cuda", dtype)
    prefix_lens = torch.tensor([10, 200, 0], device="cuda")
    accepted = torch.tensor([[0, 2, 5, -1, -1], [0, 1, 2, 3, 4], [0, 7, 8, 30, 60]], device="cuda")
    accept_len = torch.tensor([2, 4, 4], device="cuda")
    want_k, want_v = k.clone(), v.clone()
    reference.compact_kv(want_k, want_v, prefix_lens, accepted, accept_len)
    for backend in gpu_kernel_backends():
        k2, v2 = k.clone(), v.clone()
        new = eo.compact_kv(k2, v2, prefix_lens, accepted, accept_len, backend=backend)
        assert torch.equal(k2, want_k) and torch.equal(v2, want_v) and new.tolist() == [13, 205, 5]
        k3, v3 = k.clone(), v.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            eo.compact_kv(k3, v3, prefix_lens, accepted, accept_len, backend=backend)
        k3.copy_(k), v3.copy_(v)  # capture does not run the kernel; replay does
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(k3, want_k) and torch.equal(v3, want_v), backend


def test_verification_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(4)
    b, t, vocab = 16, 20, 50
    parents = random_parents(b, t, g).cpu()
    tokens = torch.randint(0, vocab, (b, t), generator=g)
    logits = torch.randn(b, t, vocab, generator=g)
    probs = torch.softmax(logits, -1)
    for cpu, gpu in zip(eo.verify_greedy(tokens, parents, logits),
                        eo.verify_greedy(tokens.cuda(), parents.cuda(), logits.cuda())):
        assert torch.equal(cpu, gpu.cpu())
    for cpu, gpu in zip(eo.verify_typical(tokens, parents, probs),
                        eo.verify_typical(tokens.cuda(), parents.cuda(), probs.cuda())):
        assert torch.equal(cpu, gpu.cpu())
    accept_len, accepted, next_token = eo.verify_sampling(tokens.cuda(), parents.cuda(), probs.cuda(), probs.cuda(),
                                                          mode="iid")
    assert accept_len.device.type == "cuda" and (accept_len >= 0).all() and (next_token < vocab).all()


@pytest.mark.parametrize("mode", ["iid", "without_replacement", "deterministic"])
def test_verify_sampling_triton_equals_reference_with_the_same_uniforms(mode):
    from efficient_ops.ops.speculative import verify_sampling_with_uniforms

    g = torch.Generator().manual_seed(5)
    b, t, vocab = 64, 24, 32000  # a real vocabulary: the kernel's passes over V run in chunks
    parents = random_parents(b, t, g)
    tokens = torch.randint(0, vocab, (b, t), generator=g).cuda()
    target = torch.softmax(torch.randn(b, t, vocab, generator=g) * 4, -1).cuda()
    draft = torch.softmax(torch.randn(b, t, vocab, generator=g) * 4, -1).cuda()
    tokens[:, 1:] = torch.multinomial(draft[torch.arange(b)[:, None], parents[:, 1:].cpu()].view(-1, vocab).cuda(), 1,
                                      generator=None).view(b, t - 1)  # children drawn from their parent's q
    u_accept = torch.rand(b, t, dtype=torch.float64, device="cuda")
    u_final = torch.rand(b, dtype=torch.float64, device="cuda")
    got = verify_sampling_with_uniforms(tokens, parents, target, draft, mode, u_accept, u_final, "triton")
    want = verify_sampling_with_uniforms(tokens, parents, target, draft, mode, u_accept, u_final, "reference")
    for a, w in zip(got, want):
        assert torch.equal(a, w)
