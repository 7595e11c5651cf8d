"""Run by tests/test_parallel.py under torchrun: one tensor-parallel rank of a small model.
Rank 0 saves the prefill logits, every cached decode step's logits and the tokens."""

import sys

import torch
import torch.distributed as dist

from magma_ipu.session import Magma
from magma_ipu.sampling import SamplingSettings
from step_recorder import recording_decode_steps


def main(config_path: str, out_path: str) -> None:
    torch.set_num_threads(1)
    magma = Magma.load(config_path)
    engine = magma.engine
    image = torch.linspace(0, 255, 50 * 60 * 3).reshape(50, 60, 3).to(torch.uint8).numpy()
    request = magma.request("A picture of", image, 10)
    prefill = engine.full_logits([request])
    with recording_decode_steps(engine) as steps:
        greedy = [t for (t,) in engine.tokens([request], SamplingSettings(temperature=0, max_out_tokens=10), [0])]
    sampled = magma.generate_batch(["A picture of", "Q: What colour is the star? A:"], images=[image, None],
                                   seeds=[3, 4], temperature=1.0, top_p=0.9, max_out_tokens=10)
    if dist.get_rank() == 0:
        torch.save({"prefill": prefill, "steps": steps, "greedy": greedy,
                    "sampled": [r.token_ids for r in sampled],
                    "local_heads": magma.model.lm.transformer.h[0].attn["attention"].n_head},
                   out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
