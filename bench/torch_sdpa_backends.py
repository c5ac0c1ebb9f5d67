# PyTorch's scaled_dot_product_attention on each of its backends (FlashAttention-2, cuDNN,
# memory-efficient) for GPT-2's attention shape, causal, bf16: one layer's forward, and forward +
# backward, ms (median of 30 after 5 warm-up runs). Why tutti's bf16 attention runs on cuDNN
# (issue #7, bench/RESULTS.md). On the GPU machine: python3 bench/torch_sdpa_backends.py
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def median_ms(fn, runs=30):
    for _ in range(5):
        fn()
    times = []
    for _ in range(runs):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


print(torch.__version__, 'cuDNN', torch.backends.cudnn.version(), torch.cuda.get_device_name())
for batch in (16, 32):
    q, k, v = (torch.randn(batch, 12, 1024, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dy = torch.randn_like(q)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        with sdpa_kernel(backend):
            forward = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            both = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(dy))
        print(f'B{batch} {backend.name:20} forward {forward:.4f} ms  forward + backward {both:.3f} ms')
