#!/usr/bin/env python3
"""Checks that tutti's GPT checkpoints and Hugging Face transformers' GPT-2 agree.

Run where torch and transformers are installed (tutti itself needs neither):

    python3 scripts/hf_interop.py --tutti BUILD/tutti --workdir DIR

Step A  tutti -> HF: trains a tiny model with `tutti train`, loads its latest checkpoint with
        GPT2LMHeadModel.from_pretrained, and compares the logits of a byte-encoded prompt
        (`tutti eval --logits-out`) and the greedy continuation (`tutti generate --temperature 0`)
        with transformers'.
Step B  HF -> tutti: saves a random GPT2LMHeadModel with save_pretrained(safe_serialization=True)
        and compares `tutti eval --checkpoint` on it with transformers' logits and greedy
        continuation.

The transformers reference runs in float64 on the CPU with eager attention, so the comparison
measures tutti's error, not the reference's. Relative error = max|tutti - hf| / max|hf|.
Prints a PASS/FAIL table; exits 1 when a check fails, 2 on bad usage.
"""
import argparse
import array
import copy
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import traceback

REL_TOL = 1e-4
SAFETENSORS_DTYPES = {"F32": ("f", 4), "I32": ("i", 4), "I64": ("q", 8), "F64": ("d", 8)}


# ---------------------------------------------------------------------------------------------
# safetensors, parsed by hand (no dependency beyond the standard library)
# ---------------------------------------------------------------------------------------------

def read_safetensors(path):
    """Returns ({name: (dtype, shape, flat list of values)}, metadata) of a safetensors file."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: {len(blob)} bytes, too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > len(blob) - 8:
        raise ValueError(f"{path}: header length {header_len} exceeds the file")
    header = json.loads(blob[8:8 + header_len].decode("utf-8"))
    data = memoryview(blob)[8 + header_len:]
    metadata = header.pop("__metadata__", {})
    tensors = {}
    covered = 0
    for name, info in header.items():
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor '{name}' has dtype {dtype}, which this reader does not decode")
        code, size = SAFETENSORS_DTYPES[dtype]
        numel = 1
        for d in shape:
            numel *= d
        if not 0 <= begin <= end <= len(data) or end - begin != numel * size:
            raise ValueError(f"{path}: tensor '{name}' data_offsets [{begin}, {end}] do not fit shape {shape}")
        values = array.array(code)
        values.frombytes(data[begin:end].tobytes())
        if sys.byteorder != "little":
            values.byteswap()
        tensors[name] = (dtype, list(shape), values)
        covered += end - begin
    if covered != len(data):
        raise ValueError(f"{path}: tensors cover {covered} of {len(data)} data bytes")
    return tensors, metadata


def read_logits(path):
    """The tensor 'logits' (T, V) f32 of a file `tutti eval --logits-out` wrote, as float64 torch."""
    import torch

    tensors, _ = read_safetensors(path)
    if "logits" not in tensors:
        raise ValueError(f"{path}: no tensor named 'logits' (has {sorted(tensors)})")
    dtype, shape, values = tensors["logits"]
    if dtype != "F32" or len(shape) != 2:
        raise ValueError(f"{path}: 'logits' is {dtype} {shape}, expected F32 (T, V)")
    return torch.tensor(values.tolist(), dtype=torch.float64).reshape(shape)


# ---------------------------------------------------------------------------------------------
# transformers side
# ---------------------------------------------------------------------------------------------

def load_hf(checkpoint_dir):
    """GPT2LMHeadModel from a directory in float64 on the CPU, with the loading report."""
    import torch
    from transformers import GPT2LMHeadModel

    kwargs = {"output_loading_info": True}
    try:
        model, info = GPT2LMHeadModel.from_pretrained(checkpoint_dir, attn_implementation="eager", **kwargs)
    except (TypeError, ValueError):  # transformers without attn_implementation
        model, info = GPT2LMHeadModel.from_pretrained(checkpoint_dir, **kwargs)
    return model.to(device="cpu", dtype=torch.float64).eval(), info


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        ids = torch.tensor([tokens], dtype=torch.long)
        return model(ids).logits[0].to(torch.float64)


def hf_greedy(model, tokens, n):
    """model.generate(do_sample=False) with end-of-text stopping off (tutti never stops early)."""
    import torch

    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    config.max_new_tokens = n
    config.min_new_tokens = None
    config.eos_token_id = None
    config.pad_token_id = 0
    for sampling_only in ("temperature", "top_k", "top_p"):
        if hasattr(config, sampling_only):
            setattr(config, sampling_only, None)
    ids = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    return out[0, len(tokens):].tolist()


def hf_margin(model, tokens):
    """Gap between the two largest next-token logits after `tokens` (small: a near tie)."""
    top = hf_logits(model, tokens)[-1].topk(2).values
    return float(top[0] - top[1])


def loading_problems(info):
    """What from_pretrained did not match, ignoring the tied head and causal-mask buffers."""
    ignorable = ("lm_head.weight", ".attn.bias", ".attn.masked_bias")
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        for key in info.get(kind, []) or []:
            if not (isinstance(key, str) and key.endswith(ignorable)):
                problems.append(f"{kind}: {key}")
    return problems


def check_tied(model):
    return model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


# ---------------------------------------------------------------------------------------------
# tutti side
# ---------------------------------------------------------------------------------------------

def run_tutti(args, *command, timeout=1200):
    cmd = [args.tutti, *command, *args.tutti_arg]
    print("$ " + " ".join(repr(c) if ("\n" in c or " " in c) else c for c in cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-10:]
        raise RuntimeError(f"{command[0]} exited with {proc.returncode}: " + " | ".join(err))
    return proc.stdout


def tutti_logits(args, checkpoint, prompt, out_file):
    run_tutti(args, "eval", "--checkpoint", checkpoint, "--prompt", prompt, "--logits-out", out_file)
    return read_logits(out_file)


def tutti_greedy(args, checkpoint, prompt, n):
    """The continuation's bytes; one trailing newline that tutti may print is allowed."""
    return run_tutti(args, "generate", "--checkpoint", checkpoint, "--prompt", prompt,
                     "--max-tokens", str(n), "--temperature", "0")


def latest_checkpoint(run_dir):
    with open(os.path.join(run_dir, "latest"), encoding="utf-8") as f:
        name = f.read().strip()
    for candidate in (os.path.join(run_dir, "checkpoints", name), os.path.join(run_dir, name), name):
        if os.path.isfile(os.path.join(candidate, "model.safetensors")):
            return candidate
    raise FileNotFoundError(f"{run_dir}/latest names '{name}', which holds no model.safetensors")


def write_training_text(path, size=200_000, seed=0):
    """Deterministic English-like text, so the run needs no download."""
    rng = random.Random(seed)
    words = ("the king and queen of night shall speak to thee my lord what light through yonder "
             "window breaks it is the east and juliet is the sun arise fair sun").split()
    lines = []
    total = 0
    while total < size:
        speaker = rng.choice(("ROMEO", "JULIET", "NURSE", "MERCUTIO"))
        line = f"{speaker}:\n" + " ".join(rng.choice(words) for _ in range(rng.randint(6, 16))).capitalize() + ".\n\n"
        lines.append(line)
        total += len(line)
    with open(path, "w", encoding="ascii") as f:
        f.write("".join(lines))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

class Report:
    def __init__(self):
        self.rows = []

    def add(self, name, ok, detail):
        self.rows.append((name, "PASS" if ok else "FAIL", detail))
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    def attempt(self, name, fn):
        """Runs fn() -> (ok, detail); an exception is a FAIL with its message."""
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - every failure belongs in the table
            traceback.print_exc()
            ok, detail = False, f"{type(e).__name__}: {e}"
        self.add(name, ok, detail)
        return ok

    def print_table(self):
        width = max(len(r[0]) for r in self.rows) if self.rows else 10
        print("\n" + "check".ljust(width) + "  result  detail")
        print("-" * (width + 60))
        for name, result, detail in self.rows:
            print(f"{name.ljust(width)}  {result.ljust(6)}  {detail}")
        failed = sum(r[1] == "FAIL" for r in self.rows)
        print(f"\n{len(self.rows) - failed} passed, {failed} failed")
        return failed == 0


def compare_logits(tutti, hf):
    if tuple(tutti.shape) != tuple(hf.shape):
        return False, f"shape {tuple(tutti.shape)} vs transformers {tuple(hf.shape)}"
    err = float((tutti - hf).abs().max() / hf.abs().max())
    return err < REL_TOL, f"max rel err {err:.3e} (tolerance {REL_TOL:g}), shape {tuple(hf.shape)}"


def compare_greedy(model, prompt_tokens, tutti_bytes, n):
    hf_tokens = hf_greedy(model, prompt_tokens, n)
    expected = bytes(hf_tokens)
    got = tutti_bytes[:-1] if tutti_bytes == expected + b"\n" else tutti_bytes
    if got == expected:
        return True, f"{n} tokens identical: {expected.decode('utf-8', 'replace')!r}"
    first = next((i for i in range(min(len(got), len(expected))) if got[i] != expected[i]),
                 min(len(got), len(expected)))
    detail = f"first difference at token {first}: tutti {got!r} vs transformers {expected!r}"
    if first < len(expected):
        margin = hf_margin(model, prompt_tokens + hf_tokens[:first])
        detail += f"; transformers' top-2 logit gap there is {margin:.2e}"
        if margin < 1e-4:
            detail += " (a near tie: float32 rounding can flip it)"
    return False, detail


def step_a(args, report):
    run_dir = os.path.join(args.workdir, "run")
    if args.checkpoint:
        checkpoint = args.checkpoint
    else:
        shutil.rmtree(run_dir, ignore_errors=True)
        data = args.data or os.path.join(args.workdir, "train.txt")
        if not args.data:
            write_training_text(data)

        def train():
            run_tutti(args, "train", "--data", data, "--out", run_dir, "--layers", "2", "--heads", "2",
                      "--dim", "64", "--context", str(args.context), "--batch", "4", "--steps", "20",
                      "--eval-interval", "10", "--checkpoint-interval", "20", "--sample-tokens", "0")
            return True, f"20 steps into {run_dir}"

        if not report.attempt("A: tutti train", train):
            return
        checkpoint = latest_checkpoint(run_dir)
    prompt_tokens = list(args.prompt.encode("utf-8"))

    model_box = {}

    def load():
        model, info = load_hf(checkpoint)
        model_box["model"] = model
        problems = loading_problems(info)
        tied = check_tied(model)
        return not problems and tied, (f"from_pretrained({checkpoint}): " +
                                       ("; ".join(problems) if problems else "all weights matched") +
                                       ("" if tied else "; lm_head is NOT tied to wte"))

    if not report.attempt("A: transformers loads tutti's checkpoint", load):
        return
    model = model_box["model"]
    n_positions = model.config.n_positions
    report.attempt("A: logits, tutti eval vs transformers", lambda: compare_logits(
        tutti_logits(args, checkpoint, args.prompt, os.path.join(args.workdir, "logits_a.safetensors")),
        hf_logits(model, prompt_tokens)))
    n = min(args.max_tokens, n_positions - len(prompt_tokens))
    report.attempt(f"A: greedy {n} tokens, tutti generate vs generate()", lambda: compare_greedy(
        model, prompt_tokens, tutti_greedy(args, checkpoint, args.prompt, n), n))


def step_b(args, report):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_dir = os.path.join(args.workdir, "hf_random")
    shutil.rmtree(hf_dir, ignore_errors=True)

    def save():
        torch.manual_seed(args.seed)
        config = GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=32, vocab_size=256,
                            bos_token_id=255, eos_token_id=255)  # defaults (50256) lie outside 256
        model = GPT2LMHeadModel(config)
        with torch.no_grad():  # biases and LayerNorms away from 0 and 1, so a mix-up shows
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(hf_dir, safe_serialization=True)
        files = sorted(os.listdir(hf_dir))
        return "model.safetensors" in files, f"save_pretrained wrote {files}"

    if not report.attempt("B: transformers saves a random GPT-2", save):
        return
    model, _ = load_hf(hf_dir)  # the saved weights, exactly as tutti reads them
    prompt, prompt_tokens = args.prompt, list(args.prompt.encode("utf-8"))
    if len(prompt_tokens) > model.config.n_positions:
        raise ValueError(f"the prompt's {len(prompt_tokens)} bytes exceed step B's context {model.config.n_positions}")
    report.attempt("B: logits, tutti eval vs transformers", lambda: compare_logits(
        tutti_logits(args, hf_dir, prompt, os.path.join(args.workdir, "logits_b.safetensors")),
        hf_logits(model, prompt_tokens)))
    n = min(args.max_tokens, model.config.n_positions - len(prompt_tokens))
    if n > 0:
        report.attempt(f"B: greedy {n} tokens, tutti generate vs generate()", lambda: compare_greedy(
            model, prompt_tokens, tutti_greedy(args, hf_dir, prompt, n), n))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tutti", required=True, help="the tutti program (BUILD/tutti)")
    parser.add_argument("--workdir", required=True, help="scratch directory (its run/ and hf_random/ are replaced)")
    parser.add_argument("--prompt", default="ROMEO:\nBut soft", help="prompt text, encoded as bytes")
    parser.add_argument("--max-tokens", type=int, default=32, help="greedy tokens to compare")
    parser.add_argument("--context", type=int, default=64,
                        help="context of the step A model (prompt + max tokens must fit: HF cannot slide)")
    parser.add_argument("--data", help="training text for step A (default: generated)")
    parser.add_argument("--checkpoint", help="step A: use this tutti checkpoint instead of training one")
    parser.add_argument("--steps", default="AB", help="which steps to run: A, B or AB")
    parser.add_argument("--seed", type=int, default=0, help="seed of the step B model")
    parser.add_argument("--tutti-arg", action="append", default=[],
                        help="extra argument for every tutti command (repeatable), e.g. --tutti-arg=--device=cuda")
    args = parser.parse_args()

    if not os.access(args.tutti, os.X_OK):
        parser.error(f"--tutti {args.tutti}: not an executable file")
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError as e:
        print(f"hf_interop: needs torch and transformers: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.workdir, exist_ok=True)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)

    report = Report()
    for name, step in (("A", step_a), ("B", step_b)):
        if name not in args.steps.upper():
            continue
        try:
            step(args, report)
        except Exception as e:  # noqa: BLE001 - a step that breaks is a FAIL row, the other still runs
            traceback.print_exc()
            report.add(f"{name}: unexpected error", False, f"{type(e).__name__}: {e}")
    return 0 if report.print_table() else 1


if __name__ == "__main__":
    sys.exit(main())
