"""Speed of the training step (issue 5): torch.compile, bf16 on the CPU, fused AdamW, SDPA in every
attention, and no host synchronisation in the step (memory bank, losses, cache path)."""

from __future__ import annotations

import copy
import os
import time

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from conftest import TINY_VIT, eval_view_config, train_batches, with_teacher_cache
from test_teacher_cache import LossRecorder
from unialign.config import parse_config
from unialign.training.module import SMKETraining
from unialign.training.trainer import train


# ---------------------------------------------------------------------------------------
# torch.compile, bf16 on CPU


# Inductor's first compile of the four graphs (image tower, text tower, shared block, teacher;
# forward + backward) took 126 s on the 2-core CI VM with a cold compile cache (about 12 s once
# /tmp/torchinductor_$USER is warm), over this file's time budget. By default the test
# compiles with "aot_eager" (the same Dynamo capture and AOTAutograd graphs inductor receives,
# run with eager kernels); UNIALIGN_TEST_INDUCTOR=1 runs the real default backend as well.
_INDUCTOR_SKIP = pytest.mark.skipif(
    os.environ.get("UNIALIGN_TEST_INDUCTOR") != "1",
    reason="inductor compile takes ~2 min on a 2-core CPU with a cold cache (measured 126 s); "
           "set UNIALIGN_TEST_INDUCTOR=1 to run it")


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=_INDUCTOR_SKIP)])
def test_compiled_step_matches_eager(small_world, text_model_dir, teacher_checkpoint, backend, monkeypatch):
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint)
    raw["data"]["pad_to_multiple_of"] = 1  # keep the two batches' caption lengths apart
    cfg = parse_config(raw)
    compiled_raw = copy.deepcopy(raw)
    compiled_raw["train"]["compile"] = True
    original = torch.nn.Module.compile
    compiled_parts = []

    def compile_with_backend(self, *args, **kwargs):
        compiled_parts.append(type(self).__name__)
        return original(self, *args, **{**kwargs, "backend": backend})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_with_backend)
    torch.manual_seed(0)
    eager = SMKETraining(cfg.model_dump(mode="json"))
    torch.manual_seed(0)
    compiled = SMKETraining(parse_config(compiled_raw).model_dump(mode="json"))
    assert compiled_parts == ["TimmImageTower", "TextTower", "SharedBlock", "TimmImageTower"]
    # nn.Module.compile is in place: same parameter names, so checkpoints are interchangeable.
    assert list(compiled.state_dict()) == list(eager.state_dict())
    eager.eval()  # no dropout: a compiled graph draws its random numbers differently
    compiled.eval()
    batches = train_batches(cfg, 2)  # two caption lengths: the recompile for a new shape must work too
    assert batches[0]["input_ids"].shape[1] != batches[1]["input_ids"].shape[1]
    import torch._dynamo as dynamo

    dynamo.reset()
    start = time.perf_counter()
    try:
        out = [compiled.task(b) for b in batches]
        sum(o["loss"] for o in out).backward()
    except Exception as err:  # noqa: BLE001  # pragma: no cover - depends on the machine's compiler toolchain
        pytest.skip(f"torch.compile ({backend}) does not run here: {type(err).__name__}: {str(err)[:300]}")
    print(f"compile ({backend}) + 2 steps on CPU: {time.perf_counter() - start:.1f} s")
    ref = [eager.task(b) for b in batches]
    sum(r["loss"] for r in ref).backward()
    tol = {"rtol": 1e-5, "atol": 1e-6} if backend == "aot_eager" else {"rtol": 1e-4, "atol": 1e-5}
    for i, (o, r) in enumerate(zip(out, ref, strict=True)):
        for key in ("loss", "itc", "itc_interm", "kd"):
            torch.testing.assert_close(o[key], r[key], **tol, msg=f"batch {i} {key}")
    grads = dict(eager.model.named_parameters())
    for name, p in compiled.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_bf16_mixed_on_cpu(small_world, text_model_dir, teacher_checkpoint, tmp_path):
    recorder = LossRecorder()
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, max_steps=2, precision="bf16-mixed")
    train(parse_config(raw), tmp_path / "run", callbacks=[recorder])
    assert sorted(recorder.losses) == [1, 2]
    assert all(np.isfinite(v) for v in [*recorder.losses.values(), *recorder.kd.values()])


def test_fused_adamw_only_where_lightning_allows_it(small_world, text_model_dir, teacher_checkpoint, tmp_path,
                                                   monkeypatch):
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint, max_steps=1, precision="bf16-mixed",
                           grad_clip=1.0)
    # Fused AdamW (it runs on CPU too) + clipping under mixed precision is what Lightning refuses ...
    monkeypatch.setattr(SMKETraining, "fused_adamw", lambda self: True)
    with pytest.raises(RuntimeError, match="does not allow for gradient clipping"):
        train(parse_config(raw), tmp_path / "fused")
    monkeypatch.undo()
    # ... so the module picks fused AdamW only without that combination (on CUDA and on CPU).
    for precision, clip, fused in [("bf16-mixed", None, True), ("16-mixed", None, True), ("32-true", 1.0, True),
                                   ("16-mixed", 1.0, False), ("bf16-mixed", 1.0, False)]:
        cfg = copy.deepcopy(raw)
        cfg["train"].update(precision=precision, grad_clip=clip)
        module = SMKETraining(parse_config(cfg).model_dump(mode="json"))
        for device in (torch.device("cuda", 0), torch.device("cpu")):
            with monkeypatch.context() as m:  # the module's public `device`, as after Lightning moved it
                m.setattr(SMKETraining, "device", property(lambda self, device=device: device))
                assert module.device == device
                assert module.fused_adamw() is fused, (precision, clip, device)
    # A CPU run (bf16, no clipping) really steps with the fused kernel.
    raw["train"]["grad_clip"] = None
    probe = _OptimizerProbe()
    train(parse_config(raw), tmp_path / "cpu", callbacks=[probe])
    assert probe.fused is True


class _OptimizerProbe(Callback):
    fused: bool | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.fused = trainer.optimizers[0].defaults["fused"]


# ---------------------------------------------------------------------------------------
# SDPA everywhere, no host synchronisation in the step


def test_every_attention_uses_sdpa(small_world, text_model_dir, teacher_checkpoint, monkeypatch):
    import torch.nn.functional as F

    from unialign.config import TeacherConfig
    from unialign.model.teacher import Teacher

    cfg = parse_config(eval_view_config(small_world, text_model_dir, teacher_checkpoint))
    module = SMKETraining(cfg.model_dump(mode="json")).eval()
    layers = {"image": cfg.model.image.layers, "text": cfg.model.text.layers, "shared": cfg.model.shared.depth,
              "teacher": TINY_VIT["depth"], "beit": TINY_VIT["depth"]}
    beit = Teacher(TeacherConfig(name="beitv2_base_patch16_224", pretrained=False, kwargs=TINY_VIT))
    fused = {name: m.fused_attn for part in (module, beit) for name, m in part.named_modules()
             if hasattr(m, "fused_attn")}
    # one timm attention per block of the image tower, the shared block, the teacher and the BEiT teacher
    n_timm = layers["image"] + layers["shared"] + layers["teacher"] + layers["beit"]
    assert len(fused) == n_timm and all(fused.values()), fused
    assert module.model.text_tower.model.config._attn_implementation == "sdpa"
    calls = []
    original = F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    batch = train_batches(cfg, 1)[0]
    with torch.no_grad():
        module.task(batch)
        beit(batch["image"])
    # every attention layer of the configured model runs through SDPA once per forward: image tower,
    # text tower, shared block twice (image, text), teacher, BEiT teacher
    expected = layers["image"] + layers["text"] + 2 * layers["shared"] + layers["teacher"] + layers["beit"]
    assert len(calls) == expected, (len(calls), expected)


class _SyncDetector:
    """Records Python-level reads of tensor values (what forces a host sync on a GPU)."""

    METHODS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, object] = {}

    def __enter__(self) -> _SyncDetector:
        import traceback

        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(t, *a, __name=name, __original=original, **k):
                self.calls.append(f"Tensor.{__name} at {traceback.format_stack(limit=3)[0].strip()}")
                return __original(t, *a, **k)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def test_training_step_reads_no_device_values(small_world, text_model_dir, teacher_checkpoint, teacher_cache_dir):
    """No .item()/bool()/float() on tensors in the step (losses, memory bank, cache path), once the
    bank is full and wrapping (the path that used to read its pointer from the device)."""
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint)
    for variant in (raw, with_teacher_cache(raw, teacher_cache_dir)):
        cfg = parse_config(variant)
        module = SMKETraining(cfg.model_dump(mode="json"))
        module.train()
        batches = train_batches(cfg, 3)
        for batch in batches:
            if module.teacher_cache is not None:
                batch["teacher_target"] = module.teacher_cache.lookup(batch["image_id"])
        for batch in batches[:2]:
            module.task(batch)["loss"].backward()
        assert len(module.kd.bank) == 12 and int(module.kd.bank.ptr) == 4  # full, wrapped
        with _SyncDetector() as detector:
            module.task(batches[2])["loss"].backward()
        ours = [c for c in detector.calls if "transformers/masking_utils.py" not in c]
        assert ours == [], "\n".join(ours)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; run by bench/gpu_suite.sh tests")
def test_training_step_has_no_cuda_sync(small_world, text_model_dir, teacher_checkpoint, teacher_cache_dir):
    """CUDA's own detector (``set_sync_debug_mode("error")``) over a whole bf16 step with fused
    AdamW: it also catches syncs inside ATen ops (nonzero, boolean indexing, ...), which the
    Python-level detector above cannot see."""
    raw = eval_view_config(small_world, text_model_dir, teacher_checkpoint)
    for variant in (raw, with_teacher_cache(raw, teacher_cache_dir)):
        cfg = parse_config(variant)
        module = SMKETraining(cfg.model_dump(mode="json")).cuda().train()
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4, fused=True)
        batches = train_batches(cfg, 3)
        for batch in batches:
            if module.teacher_cache is not None:
                batch["teacher_target"] = module.teacher_cache.lookup(batch["image_id"])
        batches = [{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        torch.cuda.synchronize()
        for i, batch in enumerate(batches):  # the last step runs with the bank full and wrapping
            torch.cuda.set_sync_debug_mode("error" if i == len(batches) - 1 else "default")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = module.task(batch)["loss"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss).item()

def test_text_tower_mask_needs_no_device_values(text_model_dir):
    from unialign.model.towers import TextTower

    tower = TextTower(str(text_model_dir), True, 2).eval()
    ids = torch.randint(5, 20, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 4:] = 0
    with _SyncDetector() as detector, torch.no_grad():
        tower(ids, mask)
    assert detector.calls == [], "\n".join(detector.calls)


def test_memory_bank_host_counters_follow_checkpoints():
    from unialign.losses import MemoryBank

    bank = MemoryBank(5, 2)
    bank.enqueue(torch.randn(7, 2), torch.arange(7))
    restored = MemoryBank(5, 2)
    restored.load_state_dict(bank.state_dict())
    assert len(restored) == 5 == len(bank) and int(restored.ptr) == 2 == int(bank.ptr)
    # valid() orders the ring by the host write pointer: same entries, oldest first, in both.
    for a, b in zip(bank.valid(), restored.valid(), strict=True):
        assert torch.equal(a, b)
    assert restored.valid()[1].tolist() == [2, 3, 4, 5, 6]
    # ... and the next enqueue writes from that pointer in both.
    for b in (bank, restored):
        b.enqueue(torch.ones(1, 2), torch.tensor([7]))
    for a, b in zip(bank.valid(), restored.valid(), strict=True):
        assert torch.equal(a, b)
    assert len(restored) == 5 and restored.valid()[1].tolist() == [3, 4, 5, 6, 7]
