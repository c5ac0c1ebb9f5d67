#!/usr/bin/env python3
"""The PyTorch peer of tutti's GPU benchmark: GPT-2 124M training tokens/s and MFU on one GPU.

The model is GPT-2 small as tutti's (Hugging Face GPT-2 layout): pre-LayerNorm blocks, learned
positions, biases, GELU tanh, LayerNorm eps 1e-5, LM head tied to the token embedding, no
dropout, init normal(0, 0.02) with the residual projections (attn.c_proj, mlp.c_proj) scaled by
1/sqrt(2 n_layer); 12 layers, 12 heads, dim 768, context 1024, vocabulary padded to 50304. The
linear layers are nn.Linear (weight (out, in)): the same function as Hugging Face's Conv1D with its
weight transposed. Attention is F.scaled_dot_product_attention(is_causal=True).

The step is PyTorch's fast path as people run it (nanoGPT's): torch.compile of the model (loss
included), bf16 autocast over fp32 master weights, SDPA restricted to the flash-attention backend
(bf16 only; --attention auto leaves the choice to PyTorch), fused AdamW (lr 6e-4, betas
(0.9, 0.95), eps 1e-8, weight decay 0.1 on 2-D parameters only), no gradient clipping.
TF32 is on for float32 matrix products in every mode (torch.backends.cuda.matmul.allow_tf32 and
cudnn.allow_tf32): it changes the --dtype fp32 runs; under bf16 autocast every matrix product is
bf16 already.

Data: synthetic tokens drawn on the GPU with a fixed seed (uniform over GPT-2's 50257 tokens),
targets the inputs shifted by one; a pool of 4 batches is drawn before timing and cycled.

Timing: torch.cuda.synchronize() before and after each step; warmup steps (compilation included)
are not timed. tokens/s = B T / median step; MFU = flops_per_token x tokens/s / peak, with
flops_per_token = 6 N + 12 L C T (PaLM appendix B), N = 12 L C^2 + V C the matrix weights, and
peak 989 TFLOP/s (H100 SXM dense bf16; also the H200's; --peak-tflops overrides).

Output: one markdown row (columns: impl | card | B | T | dtype | compile | attention | step ms
median | step ms best | tok/s | MFU | peak mem GiB | torch) and one JSON line; --json PATH also
writes the JSON there. bench/gpu_peer.sh prints the header and runs B16 and B32.

Without CUDA (or with --smoke) it runs a tiny configuration (2 layers, dim 64, context 64, batch 2,
fp32, eager, plain AdamW) to check the script, not to measure anything: the development machine's
torch 1.13 (CPU) has no torch.compile and no scaled_dot_product_attention, so attention falls back
to matmul + masked softmax there.

Seen once (`bash bench/gpu_peer.sh $OUT`, NVIDIA H200, torch 2.11.0+cu130, 30 timed steps after
10 warmup; the first step, compilation included, took ~25 s): B16 35.1 ms/step, 466k tok/s,
MFU 0.403, peak 8.8 GiB allocated; B32 66.0 ms/step, 497k tok/s, MFU 0.429, peak 15.5 GiB.

Letters: B batch, T context, C channels, H heads, L layers, V vocabulary.
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

GPT2_VOCAB = 50257  # tokens drawn from GPT-2's real vocabulary; the embedding has padded_vocab rows
PEAK_TFLOPS_H100_BF16 = 989.0  # H100 SXM dense bf16 (datasheet); the H200 has the same
HAS_SDPA = hasattr(F, "scaled_dot_product_attention")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--n-layer", type=int, default=12)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("--n-embd", type=int, default=768)
    p.add_argument("--vocab", type=int, default=50304, help="padded vocabulary (embedding rows)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation included)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: autocast over fp32 master weights; fp32: TF32 matrix products")
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attention", choices=("flash", "cudnn", "efficient", "math", "auto"), default=None,
                   help="the only SDPA backend allowed (default: flash for bf16, auto for fp32)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS_H100_BF16)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on whatever device there is: checks the script, measures nothing")
    p.add_argument("--json", metavar="PATH", help="also write the result here")
    p.add_argument("--kernels", metavar="PATH",
                   help="after the timed steps, profile 3 more (torch.profiler) and write the GPU "
                        "time of each kernel per step here (bench/gpu_kernels.sh)")
    a = p.parse_args()
    if a.batch < 1 or a.context < 1 or a.steps < 1 or a.warmup < 0:
        p.error("--batch, --context and --steps must be >= 1, --warmup >= 0")
    if a.n_embd % a.n_head:
        p.error("--n-embd must be a multiple of --n-head")
    return a


def apply_smoke(a, reason):
    """Shrinks the run to a syntax check: 2 layers, dim 64, context 64, fp32, eager."""
    print(f"torch_gpt2_peer.py: {reason}: tiny smoke configuration, not a measurement", file=sys.stderr)
    a.smoke = True
    a.n_layer, a.n_head, a.n_embd, a.context, a.batch = 2, 2, 64, 64, 2
    a.vocab, a.steps, a.warmup = 512, 3, 1
    a.dtype, a.compile, a.fused_adamw, a.attention = "fp32", False, False, "auto"


# ---- the model ----------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if HAS_SDPA:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # torch < 2.0 (the CPU smoke path only)
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1) @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = Attention(n_embd, n_head)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, context, vocab):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.n_layer = n_layer
        self.init_weights()

    def init_weights(self):
        # GPT-2: normal(0, 0.02); residual projections scaled by 1/sqrt(2 n_layer); biases zero;
        # LayerNorm weights one.
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(m.weight, 0.0, std)
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):  # idx, targets (B, T) int64 -> mean cross-entropy ()
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # tied LM head: (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1))


def make_optimizer(model, fused):
    """AdamW with weight decay on the 2-D parameters (matrices, embeddings) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    extra = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, **extra)


def flops_per_token(n_layer, n_embd, context, vocab):
    """Training FLOPs per token as tutti's GPTConfig::flops_per_token: 6 N + 12 L C T (PaLM
    appendix B), N the matrix weights of the blocks and the tied LM head."""
    n = 12 * n_layer * n_embd * n_embd + vocab * n_embd
    return 6 * n + 12 * n_layer * n_embd * context


# ---- setup ---------------------------------------------------------------------------------------

def choose_attention(a, cuda):
    """Leaves only the requested SDPA backend on; the flags are global, so compile sees them."""
    if a.attention is None:
        a.attention = "flash" if a.dtype == "bf16" else "auto"
    if not cuda or a.attention == "auto":
        return
    flags = {"flash": "enable_flash_sdp", "cudnn": "enable_cudnn_sdp",
             "efficient": "enable_mem_efficient_sdp", "math": "enable_math_sdp"}
    for name, setter in flags.items():
        if hasattr(torch.backends.cuda, setter):
            getattr(torch.backends.cuda, setter)(name == a.attention)


def draw_batches(a, device, count=4):  # -> list of (inputs, targets), each (B, T) int64
    gen = torch.Generator(device=device).manual_seed(a.seed)
    high = min(GPT2_VOCAB, a.vocab)
    batches = []
    for _ in range(count):
        xy = torch.randint(0, high, (a.batch, a.context + 1), generator=gen, device=device)
        batches.append((xy[:, :-1].contiguous(), xy[:, 1:].contiguous()))
    return batches


# ---- the benchmark ------------------------------------------------------------------------------

def train_step(model, opt, x, y, autocast_bf16):
    """forward -> zero grads -> backward -> update; returns the loss (on the device)."""
    if autocast_bf16:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            loss = model(x, y)
    else:
        loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def run(a):
    cuda = torch.cuda.is_available()
    if not cuda and not a.smoke:
        apply_smoke(a, "no CUDA device")
    elif a.smoke:
        apply_smoke(a, "--smoke")
    if a.compile and not hasattr(torch, "compile"):
        print("torch_gpt2_peer.py: this torch has no torch.compile: eager", file=sys.stderr)
        a.compile = False
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    choose_attention(a, cuda)
    torch.manual_seed(a.seed)
    model = GPT(a.n_layer, a.n_head, a.n_embd, a.context, a.vocab).to(device)
    model.train()
    opt = make_optimizer(model, a.fused_adamw and cuda)
    step_model = torch.compile(model) if a.compile else model
    batches = draw_batches(a, device)
    autocast_bf16 = a.dtype == "bf16" and cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    step_seconds, losses, warmup_seconds = [], [], []
    for step in range(a.warmup + a.steps):
        x, y = batches[step % len(batches)]
        sync()
        t0 = time.perf_counter()
        loss = train_step(step_model, opt, x, y, autocast_bf16)
        sync()
        dt = time.perf_counter() - t0
        losses.append(loss.item())  # after the clock: the step has finished on the device already
        (warmup_seconds if step < a.warmup else step_seconds).append(dt)

    if a.kernels and cuda:
        write_kernel_table(a, step_model, opt, batches, autocast_bf16, sync)

    tokens = a.batch * a.context
    fpt = flops_per_token(a.n_layer, a.n_embd, a.context, a.vocab)
    med, best = statistics.median(step_seconds), min(step_seconds)
    return {
        "impl": "pytorch",
        "card": torch.cuda.get_device_name() if cuda else "cpu",
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "smoke": a.smoke,
        "batch": a.batch, "context": a.context, "n_layer": a.n_layer, "n_head": a.n_head,
        "n_embd": a.n_embd, "vocab": a.vocab,
        "params": sum(p.numel() for p in model.parameters()),
        "dtype": a.dtype, "compile": a.compile, "fused_adamw": a.fused_adamw and cuda,
        "attention": a.attention if HAS_SDPA else "matmul+softmax",
        "tf32": cuda,
        "steps": a.steps, "warmup": a.warmup,
        "first_step_s": warmup_seconds[0] if warmup_seconds else None,  # compilation included
        "warmup_s": sum(warmup_seconds),
        "tokens_per_step": tokens,
        "step_ms_median": med * 1e3,
        "step_ms_best": best * 1e3,
        "tok_s_median": tokens / med,
        "tok_s_best": tokens / best,
        "flops_per_token": fpt,
        "tflops_median": fpt * tokens / med / 1e12,
        "peak_tflops": a.peak_tflops,
        "mfu_median": fpt * tokens / med / (a.peak_tflops * 1e12),
        "mfu_best": fpt * tokens / best / (a.peak_tflops * 1e12),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }, losses


def write_kernel_table(a, step_model, opt, batches, autocast_bf16, sync, steps=3):
    """GPU time per kernel name, per step (mean of `steps` profiled steps), slowest first."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for step in range(steps):
            x, y = batches[step % len(batches)]
            train_step(step_model, opt, x, y, autocast_bf16)
        sync()
    totals, counts = {}, {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.name and not e.name.startswith("Memcpy"):
            totals[e.name] = totals.get(e.name, 0.0) + getattr(e, "device_time", getattr(e, "cuda_time", 0.0)) / steps
            counts[e.name] = counts.get(e.name, 0) + 1
    with open(a.kernels, "w") as f:
        f.write(f"# PyTorch B{a.batch}: GPU us per step by kernel ({steps} steps), total "
                f"{sum(totals.values()) / 1e3:.2f} ms\n")
        for name, us in sorted(totals.items(), key=lambda kv: -kv[1]):
            f.write(f"{us:10.1f} {counts[name] // steps:5d}  {name[:160]}\n")


def markdown_row(r):
    mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
    return (f"| pytorch | {r['card']} | {r['batch']} | {r['context']} | {r['dtype']} | "
            f"{'yes' if r['compile'] else 'no'} | {r['attention']} | {r['step_ms_median']:.1f} | "
            f"{r['step_ms_best']:.1f} | {r['tok_s_median']:,.0f} | {r['mfu_median']:.3f} | {mem} | "
            f"{r['torch_version']} |")


def main():
    a = parse_args()
    result, losses = run(a)
    print(markdown_row(result))
    print(json.dumps(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    if not all(math.isfinite(v) for v in losses):
        print("torch_gpt2_peer.py: error: non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
