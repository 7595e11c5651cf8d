#!/usr/bin/env python3
"""Write magma_interactive.ipynb from the cells below (the notebook is generated, so it diffs cleanly)."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent

CELLS = [
    new_markdown_cell("""# MAGMA interactive: captions and answers about images

**MAGMA** turns a picture into a prefix for a language model. A CLIP ResNet (RN50x16 in the real model)
looks at the image; its 12 x 12 grid of features becomes 144 embeddings in front of your prompt, and
GPT-J 6B, with small adapters in every block, continues the text. Ask for a caption (`A picture of`) or a
question (`Q: What colour is the square? A:`).

This notebook starts with the **embedded demo model**: MAGMA's exact architecture and checkpoint format
at toy size, trained on drawn scenes of coloured shapes. It runs on a laptop CPU in seconds. Switch to
the real model by changing `MODEL` below."""),
    new_code_cell("""from magma_ipu import init_inference_session, run_inference

MODEL = "demo"          # or "magma_v1_500" / "magma_v1_1024" (GPT-J 6B and its 13 GB checkpoint)
CHECKPOINT = None       # demo: the embedded weights; real model: a path to magma_demo.pt, or None for the hub
OVERRIDES = {}          # any config field, e.g. {"device": "cuda", "dtype": "bfloat16", "quantize": "int8"}

session, config, tokenizer = init_inference_session(MODEL, checkpoint_path=CHECKPOINT, **OVERRIDES)
print(f"{config.name}: {config.model.n_layer} blocks, d_model {config.model.d_model}, "
      f"{config.model.image_tokens} image positions, on {config.device} in {config.dtype}")"""),
    new_markdown_cell("""## Try it

Pick a demo image, or type an image URL or path, or upload a picture; edit the prompt; press **Run**.
The caption streams in as it is generated.

The sliders change only how the next token is drawn, never the model (nothing is reloaded):
- **temperature**: 0 always takes the most likely token; higher values flatten the distribution.
- **top_k**: keep only the k most likely tokens (0 = all).
- **top_p**: keep the smallest set of most likely tokens whose probabilities add up to p (1 = all).
- **seed**: the same seed and settings give the same text again.
- **max_out_tokens**: the most tokens to generate; generation also stops at the end-of-text token."""),
    new_code_cell("""from magma_ipu.notebook import CaptionApp

app = CaptionApp(session, image="scene_1.png")
display(app)
app.run().text  # a first caption, for the image the dropdown shows"""),
    new_markdown_cell("""## The same thing in one call

`run_inference` is the demo's original function; `session.generate`, `session.stream` and
`session.generate_batch` are the object API behind it."""),
    new_code_cell("""run_inference(session, config, tokenizer, "demo_example_images/scene_1.png", "A picture of",
              seed=0, top_p=0.9, top_k=0, temperature=0.0, max_out_tokens=40)"""),
    new_code_cell("""session.generate("Q: What colour is the background? A:", image="demo_example_images/scene_1.png",
                 temperature=0, max_out_tokens=4).text"""),
    new_markdown_cell("""## The real model

The same code runs MAGMA v1: `init_inference_session("magma_v1_500", checkpoint_path=...)`. With no
overrides it chooses for the machine and says so: float16 on a GPU, or int8 on a CPU when it fits (about
7.5 GB of memory; a first start converts the checkpoint into a 7.5 GB int8 cache, later starts map it).
Before anything slow it checks memory and disk, and says what would fit if the choice does not. Overrides
win: `device="cuda", quantize="int8"` for int8 weights on a GPU, `compile=True` to capture the decode step
with `torch.compile` (CUDA graphs on CUDA). The checkpoint is read with torch's safe `weights_only` loader
through a read-only mapping, so loading never holds two copies.

A GPU smaller than the model: `max_device_memory="6GiB"` keeps what does not fit in host memory and streams
it block by block (works here). Several GPUs: tensor parallelism needs one process per GPU, which one
notebook kernel cannot be, so it runs from the command line:
`torchrun --nproc-per-node 4 run_inference.py --config magma_v1_500 --device cuda --tensor_parallel 4`.
On a CPU, `quantize="int8"` is about 2.2x faster per token than float32 (`compile=True` adds about 10 %,
after 20-25 s of compiling per prompt bucket and cache length)."""),
]


def main() -> None:
    for number, cell in enumerate(CELLS):  # stable ids: regenerating changes only what was edited
        cell.id = f"cell-{number}"
    nb = new_notebook(cells=CELLS, metadata={
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    })
    nbformat.write(nb, ROOT / "magma_interactive.ipynb")


if __name__ == "__main__":
    main()
