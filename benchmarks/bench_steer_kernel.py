"""Fused steering kernel vs its torch reference, on CUDA.

Every token is steered (the worst case: the whole hidden block is read and written),
tokens split evenly over min(tokens, --max-rows) requests, as in a mixed batch.

    python benchmarks/bench_steer_kernel.py --tokens 1 64 512 8192 --hidden 4096
"""
import argparse
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def make_batch(
    num_tokens: int, hidden_size: int, max_rows: int, dtype: torch.dtype
) -> dict[str, torch.Tensor | None]:
    """Arguments of `steer_` for a batch where every token gets steered."""
    num_rows = min(num_tokens, max_rows)
    lens = torch.full((num_rows,), num_tokens // num_rows)
    lens[: num_tokens % num_rows] += 1
    qsl = torch.zeros(num_rows + 1, dtype=torch.int32)
    qsl[1:] = lens.cumsum(0)
    return {
        "hidden": torch.randn(num_tokens, hidden_size, dtype=dtype),
        "positions": torch.arange(num_tokens),
        "query_start_loc": qsl,
        "scale": torch.rand(num_rows) + 0.5,
        "vector_id": torch.arange(num_rows) % 4,
        "prompt_len": torch.zeros(num_rows, dtype=torch.int64),
        "steer_tokens": torch.full((num_rows,), 2**40),
        "vectors": torch.randn(4, hidden_size),
        "slot_mapping": None,
    }


def compare(name: str, reference, fused, batch_of, doc: str) -> None:
    """Time `reference` and `fused` on `batch_of(tokens, hidden, max_rows, dtype)` batches
    (on CUDA) over the command line's sizes, and print the table."""
    parser = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 1024, 8192])
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096])
    parser.add_argument("--max-rows", type=int, default=256, help="most requests in a batch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(f"{name}: needs a CUDA GPU; none found, nothing to time.")
        sys.exit(0)

    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  max_rows={args.max_rows}")
    header = ("tokens", "hidden", "torch ms", "triton ms", "speedup", "triton GB/s")
    print("{:>7} {:>7} {:>10} {:>10} {:>8} {:>12}".format(*header))
    for hidden_size in args.hidden:
        for num_tokens in args.tokens:
            batch = {
                k: None if v is None else v.cuda()
                for k, v in batch_of(num_tokens, hidden_size, args.max_rows, dtype).items()
            }
            torch_ms = do_bench(lambda: reference(**batch))
            triton_ms = do_bench(lambda: fused(**batch))
            moved = 2 * batch["hidden"].numel() * batch["hidden"].element_size()  # read + write
            print(
                f"{num_tokens:>7} {hidden_size:>7} {torch_ms:>10.4f} {triton_ms:>10.4f} "
                f"{torch_ms / triton_ms:>7.1f}x {moved / triton_ms / 1e6:>12.1f}"
            )


def main() -> None:
    from vllm_safeinfer.kernels.steer import steer_reference, steer_triton

    compare("bench_steer_kernel", steer_reference, steer_triton, make_batch, __doc__)


if __name__ == "__main__":
    main()
