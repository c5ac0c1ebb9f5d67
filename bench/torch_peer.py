#!/usr/bin/python3
"""The PyTorch peer of bench/train_bench.cpp: the same GPT-2 training step, timed the same way.

GPT-2 exactly as Hugging Face's GPT2LMHeadModel (pre-LayerNorm, learned positions, biases,
GELU tanh, LayerNorm eps 1e-5, LM head tied to the token embedding, no dropout), fp32, trained
with torch.optim.AdamW (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.1 on 2-D
parameters only). Attention is written with matmul + masked softmax (nanoGPT's slow path):
torch 1.13 has no scaled_dot_product_attention.

Threads (../shared/MACHINE.md): torch.set_num_threads does not control OpenBLAS, which runs the
GEMMs, and OpenBLAS and libgomp read their settings when torch is imported, so the environment is
set here before `import torch`. Settings:
  single  torch 1 thread, OpenBLAS 1 thread                          (--threads 1)
  blas    torch 1 thread, OpenBLAS T threads                         (--threads 2 default)
  omp     torch T threads with OMP_WAIT_POLICY=PASSIVE, OpenBLAS T threads
  naive   torch T threads, OpenBLAS T threads, default (spinning) OpenMP wait policy
Run it with /usr/bin/python3 (Debian's python3-torch); the python3 first on PATH has no torch.

--check DIR replays a `train_bench --dump DIR` run (tutti's initial weights, batches and losses)
in this model and optimizer and fails unless every step's loss agrees: the proof that the peer
computes what tutti computes.

Letters: B batch, T context, C channels, H heads, V vocabulary.
"""
import argparse
import json
import os
import statistics
import sys
import time

WORKLOADS = {
    # name: (n_layer, n_head, n_embd, context, batch)
    "W1": (4, 4, 128, 128, 8),
    "W2": (6, 6, 384, 256, 8),
}
SETTINGS = ("single", "blas", "omp", "naive")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    p.add_argument("--steps", type=int, default=20, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--setting", choices=SETTINGS, default=None,
                   help="thread setting (default: single for 1 thread, blas for more)")
    p.add_argument("--data", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "..", "data", "tinyshakespeare.txt"),
                   help="byte-level text to draw batches from (random tokens when missing)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--check", metavar="DIR", help="replay `train_bench --dump DIR` and compare losses")
    a = p.parse_args()
    if a.threads < 1 or a.steps < 1 or a.warmup < 0:
        p.error("--threads and --steps must be >= 1, --warmup >= 0")
    if a.setting is None:
        a.setting = "single" if a.threads == 1 else "blas"
    if a.setting == "single" and a.threads != 1:
        p.error("--setting single needs --threads 1")
    return a


def configure_threads_env(setting, threads):
    """Sets the variables OpenBLAS and libgomp read at load time; returns torch's thread count."""
    blas_threads = 1 if setting == "single" else threads
    torch_threads = threads if setting in ("omp", "naive") else 1
    os.environ["OPENBLAS_NUM_THREADS"] = str(blas_threads)
    os.environ["OMP_NUM_THREADS"] = str(torch_threads)
    os.environ["MKL_NUM_THREADS"] = str(torch_threads)
    if setting == "omp":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ.pop("OMP_WAIT_POLICY", None)
    return torch_threads


# Run as a program, the command line chooses the threads before torch loads. Imported as a module
# (bench/torch_ddp_peer.py reuses the model, data and optimizer), the importer sets the environment.
if __name__ == "__main__":
    ARGS = parse_args()
    TORCH_THREADS = configure_threads_env(ARGS.setting, ARGS.threads)

import ctypes  # noqa: E402
import math  # noqa: E402
import struct  # noqa: E402

import torch  # noqa: E402  (after the environment is set: see the module docstring)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


# ---- the model ----------------------------------------------------------------------------------

class Conv1D(nn.Module):
    """y = x W + b with W stored (in, out), as Hugging Face's GPT-2."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):  # (..., in) -> (..., out)
        return torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight).view(*x.shape[:-1], -1)


class Attention(nn.Module):
    def __init__(self, n_embd, n_head, context):
        super().__init__()
        self.n_head = n_head
        self.c_attn = Conv1D(n_embd, 3 * n_embd)
        self.c_proj = Conv1D(n_embd, n_embd)
        mask = torch.tril(torch.ones(context, context, dtype=torch.bool)).view(1, 1, context, context)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
        att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = Conv1D(n_embd, 4 * n_embd)
        self.c_proj = Conv1D(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, context):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = Attention(n_embd, n_head, context)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, context, vocab=256):
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(context, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, context) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        self.n_layer = n_layer

    def init_weights(self):
        # GPT-2: normal(0, 0.02); residual projections scaled by 1/sqrt(2 n_layer); biases zero;
        # LayerNorm weights one.
        for name, m in self.named_modules():
            if isinstance(m, (Conv1D, nn.Embedding)):
                std = 0.02 / math.sqrt(2 * self.n_layer) if name.endswith("c_proj") else 0.02
                nn.init.normal_(m.weight, 0.0, std)
                if isinstance(m, Conv1D):
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, idx, targets):  # idx, targets (B, T) int64 -> mean cross-entropy ()
        B, T = idx.shape
        pos = torch.arange(T, dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # tied LM head: (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def make_optimizer(model):
    """AdamW with weight decay on the 2-D parameters (matrices, embeddings) only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


def flops_per_token(n_layer, n_head, n_embd, context, vocab=256):
    """Training FLOPs per token as tutti's GPTConfig::flops_per_token: 6 N + 12 L C T (PaLM
    appendix B), N the matrix weights of the blocks and the tied LM head."""
    n = 12 * n_layer * n_embd * n_embd + vocab * n_embd
    return 6 * n + 12 * n_layer * n_embd * context


# ---- data ---------------------------------------------------------------------------------------

class Batches:
    """Random windows of a byte-level text (or random tokens when there is no file)."""

    def __init__(self, path, batch, context, seed):
        self.batch, self.context = batch, context
        self.gen = torch.Generator().manual_seed(seed)
        self.data = None
        if path and os.path.exists(path):
            with open(path, "rb") as f:
                raw = f.read()
            if len(raw) > context + 1:
                self.data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        self.source = os.path.relpath(path) if self.data is not None else "random tokens"

    def next(self):  # -> inputs, targets (B, T) int64
        B, T = self.batch, self.context
        if self.data is None:
            xy = torch.randint(0, 256, (B, T + 1), generator=self.gen)
        else:
            starts = torch.randint(0, self.data.numel() - T - 1, (B,), generator=self.gen)
            xy = torch.stack([self.data[s:s + T + 1] for s in starts.tolist()])
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


# ---- threads as the libraries see them -----------------------------------------------------------

def blas_info():
    """The BLAS library torch loaded and its thread count (OpenBLAS only)."""
    lib = "unknown"
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                if "blas" in line and ".so" in line:
                    lib = os.path.realpath(line.split()[-1])
                    if "openblas" in lib:
                        break
    except OSError:
        pass
    threads = None
    if "openblas" in lib:
        try:
            threads = ctypes.CDLL(lib).openblas_get_num_threads()
        except (OSError, AttributeError):
            pass
    return os.path.basename(lib), threads


# ---- the cross-check against tutti --------------------------------------------------------------

def read_safetensors(path):
    """name -> tensor of a safetensors file (F32 only, as tutti writes)."""
    with open(path, "rb") as f:
        raw = f.read()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] != "F32":
            raise ValueError(f"{name}: dtype {entry['dtype']}, expected F32")
        begin, end = (8 + header_len + o for o in entry["data_offsets"])
        tensors[name] = torch.frombuffer(bytearray(raw[begin:end]), dtype=torch.float32).view(entry["shape"])
    return tensors


def check_against(directory):
    """Replays tutti's dumped run; returns the result and whether every loss agreed."""
    with open(os.path.join(directory, "losses.json")) as f:
        expected = json.load(f)
    n_layer, n_head, n_embd, context, batch = WORKLOADS[expected["workload"]]
    model = GPT(n_layer, n_head, n_embd, context)
    state = {}
    for name, t in read_safetensors(os.path.join(directory, "model.safetensors")).items():
        name = name.removeprefix("transformer.")
        if name != "lm_head.weight" and not name.endswith((".attn.bias", ".attn.masked_bias")):
            state[name] = t
    model.load_state_dict(state, strict=True)
    opt = make_optimizer(model)
    with open(os.path.join(directory, "batches.i32"), "rb") as f:
        tokens = torch.frombuffer(bytearray(f.read()), dtype=torch.int32).long()
    tokens = tokens.view(-1, 2, batch, context)  # per step: inputs, targets (B, T)
    losses = []
    for step in range(len(expected["losses"])):
        loss = model(tokens[step, 0], tokens[step, 1])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    diffs = [abs(a - b) for a, b in zip(losses, expected["losses"])]
    ok = max(diffs) <= 1e-4 * max(1.0, max(abs(v) for v in expected["losses"]))
    return {"impl": "check", "workload": expected["workload"], "steps": len(losses),
            "tutti_losses": expected["losses"], "pytorch_losses": losses,
            "max_abs_diff": max(diffs), "ok": ok}, ok


# ---- the benchmark ------------------------------------------------------------------------------

def main():
    if ARGS.check:
        torch.set_num_threads(TORCH_THREADS)
        try:
            result, ok = check_against(ARGS.check)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            print(f"torch_peer.py: error: cannot replay {ARGS.check}: {e}", file=sys.stderr)
            return 2
        if ARGS.json:
            print(json.dumps(result))
        else:
            for step, (a, b) in enumerate(zip(result["tutti_losses"], result["pytorch_losses"])):
                print(f"step {step}: tutti {a:.6f}  pytorch {b:.6f}  diff {abs(a - b):.1e}")
            print(f"{result['workload']}: max |diff| {result['max_abs_diff']:.1e}: "
                  + ("same computation" if ok else "MISMATCH"))
        return 0 if ok else 1

    n_layer, n_head, n_embd, context, batch = WORKLOADS[ARGS.workload]
    torch.set_num_threads(TORCH_THREADS)
    torch.manual_seed(ARGS.seed)

    model = GPT(n_layer, n_head, n_embd, context)
    model.init_weights()
    model.train()
    opt = make_optimizer(model)
    data = Batches(ARGS.data, batch, context, ARGS.seed)

    step_seconds, losses = [], []
    for step in range(ARGS.warmup + ARGS.steps):
        t0 = time.perf_counter()
        x, y = data.next()
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_value = loss.item()  # inside the timed region, as the C++ bench reads its loss
        dt = time.perf_counter() - t0
        losses.append(loss_value)
        if step >= ARGS.warmup:
            step_seconds.append(dt)

    tokens = batch * context
    fpt = flops_per_token(n_layer, n_head, n_embd, context)
    med, best = statistics.median(step_seconds), min(step_seconds)
    blas_lib, blas_threads = blas_info()
    result = {
        "impl": "pytorch",
        "workload": ARGS.workload,
        "threads": ARGS.threads,
        "setting": ARGS.setting,
        "torch_threads": torch.get_num_threads(),
        "blas": blas_lib,
        "blas_threads": blas_threads,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "torch_version": torch.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "data": data.source,
        "steps": ARGS.steps,
        "warmup": ARGS.warmup,
        "tokens_per_step": tokens,
        "step_ms_median": med * 1e3,
        "step_ms_best": best * 1e3,
        "tok_s_median": tokens / med,
        "tok_s_best": tokens / best,
        "flops_per_token": fpt,
        "gflops_median": fpt * tokens / med / 1e9,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }
    if ARGS.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>16}: {v:.1f}" if isinstance(v, float) else f"{k:>16}: {v}")
    if not all(math.isfinite(v) for v in losses):
        print("error: non-finite loss", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
