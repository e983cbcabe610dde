"""Fused target-projection kernel vs its torch reference, on CUDA.

Every token is projected (the worst case: a dot pass and an update pass over the whole
hidden block, with vLLM's residual half read too), tokens split evenly over
min(tokens, --max-rows) requests, as in a mixed batch.

    python benchmarks/bench_project_kernel.py --tokens 1 64 512 8192 --hidden 4096
"""
import torch

from bench_steer_kernel import compare, make_batch


def make_projection(num_tokens: int, hidden_size: int, max_rows: int, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor | None]:
    """Arguments of `project_` for a batch where every token gets projected."""
    batch = make_batch(num_tokens, hidden_size, max_rows, dtype)
    vectors = batch.pop("vectors")
    return {"hidden": batch.pop("hidden"),
            "residual": torch.randn(num_tokens, hidden_size, dtype=dtype),
            "positions": batch.pop("positions"), "query_start_loc": batch.pop("query_start_loc"),
            "target": batch.pop("scale") * 8.0, "vector_id": batch.pop("vector_id"),
            "prompt_len": batch.pop("prompt_len"), "steer_tokens": batch.pop("steer_tokens"),
            "units": vectors / vectors.norm(dim=-1, keepdim=True),
            "slot_mapping": batch.pop("slot_mapping")}


def main() -> None:
    from vllm_safeinfer.kernels.project import project_reference, project_triton

    compare("bench_project_kernel", project_reference, project_triton, make_projection,
            __doc__)


if __name__ == "__main__":
    main()
