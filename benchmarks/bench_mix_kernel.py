"""Fused SafeInfer mix kernel vs its torch reference (`safeinfer_mix`), on CUDA.

All rows active, written into a separate `out` so every call sees the same inputs.

    python benchmarks/bench_mix_kernel.py --rows 1 32 256 --vocab 32000 151936 --dtype bf16
"""
import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--lam", type=float, default=0.99)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_mix_kernel: needs a CUDA GPU; none found, nothing to time.")
        sys.exit(0)

    from triton.testing import do_bench

    from vllm_safeinfer.kernels.mix import mix_reference, mix_triton

    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  lam={args.lam}")
    header = ("rows", "vocab", "torch ms", "triton ms", "speedup", "triton GB/s")
    print("{:>5} {:>7} {:>10} {:>10} {:>8} {:>12}".format(*header))
    for vocab_size in args.vocab:
        for num_rows in args.rows:
            logits = torch.randn(num_rows, vocab_size, device="cuda").mul_(4).to(dtype)
            expert = torch.randn(num_rows, vocab_size, device="cuda").mul_(4).to(dtype)
            lam = torch.full((num_rows,), args.lam, device="cuda")
            active = torch.ones(num_rows, dtype=torch.bool, device="cuda")
            out = torch.empty_like(logits)
            torch_ms = do_bench(lambda: mix_reference(logits, expert, lam, active, vocab_size, out))
            triton_ms = do_bench(lambda: mix_triton(logits, expert, lam, active, vocab_size, out))
            # Two passes over both inputs, one write.
            moved = 5 * logits.numel() * logits.element_size()
            print(
                f"{num_rows:>5} {vocab_size:>7} {torch_ms:>10.4f} {triton_ms:>10.4f} "
                f"{torch_ms / triton_ms:>7.1f}x {moved / triton_ms / 1e6:>12.1f}"
            )


if __name__ == "__main__":
    main()
